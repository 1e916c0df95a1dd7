"""The layers of matrix capsules with EM routing (Hinton, Sabour & Frosst 2018, chapter 08).

A layer of matrix capsules holds, at every position of a grid and for every capsule type, a 4x4
pose matrix and an activation in (0, 1): poses (B, H, W, T, 4, 4) and activations (B, H, W, T).
A capsule layer above it sees, for each of its positions, the children in a K x K window (or the
whole grid, for the class capsules); each child i votes ``V_ij = M_i W_ij`` for each parent type
j, and :func:`capsutil.routing.em_routing` turns the votes into the parents' poses and
activations. These modules only hold parameters, cut windows and compute votes.

Index letters, as in :mod:`capsutil.routing`: ``r`` routing row (one image at one output
position), ``i`` child capsule, ``j`` parent capsule, ``x``, ``y``, ``z`` rows and columns of
4x4 pose matrices.

Overlapping windows: a child that lies in several windows (K=3, stride 1 or 2) votes in each of
them, and each window routes on its own, so the child's assignments sum to one over the parents
of *each* window, not over all the parents it reaches. This is what nearly every public
implementation does; the paper's procedure lets all those parents compete for the child
(Gritzman 2019 implements that). Chapter 08 discusses the difference.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from capsutil.routing import em_routing

POSE_SIZE = 4                     # poses are 4x4 matrices
POSE_DIMS = POSE_SIZE * POSE_SIZE
# Entries of the stored transformation matrices start with this standard deviation.
WEIGHT_SCALE = 0.5
# Votes per chunk of rows routed under activation checkpointing (see _RoutedCaps.route).
ROUTING_CHUNK_BYTES = 128 * 2**20
# Starting value of every routed layer's beta_u. A parent's cost per unit of assigned mass is
# beta_u + ln(sigma) summed over the 16 pose entries. The untrained votes spread widely (their
# scale grows with the layer's fan-in, see _RoutedCaps), so ln(sigma) starts positive: with
# beta_u = 0 every vote *raises* a parent's cost and training learns to classify by exclusion
# (the winning class is the one that receives no votes). Starting at -3 makes mass that agrees
# lower the cost, the regime the paper's activation rule is written for (chapter 08 measures
# both). The value suits the small and the paper's configurations; much narrower networks
# (4 types per layer, smaller fan-ins) start with a class saturated at activation 1 and can
# fail to learn.
BETA_U_INIT = -3.0
# Flat indices (in a 4x4 pose flattened row by row) of the two entries that coordinate addition
# changes: the first two elements of the right-hand column.
ROW_ENTRY, COLUMN_ENTRY = POSE_SIZE - 1, 2 * POSE_SIZE - 1


def transform_votes(poses: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Votes ``V_rji = M_ri W_ij``: poses (R, I, 4, 4) and weight (I, J, 4, 4) -> (R, J, I, 16).

    The votes are laid out parent-major, as :func:`em_routing` sums over children; pass them as
    ``votes.transpose(1, 2)`` (a view of shape (R, I, J, 16)) so routing copies nothing.
    """
    rows, children = poses.shape[:2]
    votes = torch.einsum("rixy,ijyz->rjixz", poses, weight)            # (R, J, I, 4, 4)
    return votes.contiguous().view(rows, weight.shape[1], children, POSE_DIMS)   # (R, J, I, 16)


def windows(grid: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """The K x K windows of a capsule grid: (B, H, W, T, E) -> (B, Ho, Wo, K*K*T, E).

    ``Ho = (H - K) // stride + 1`` (no padding), and likewise ``Wo``. Child ``i`` of a window is
    ``(row_in_window * K + column_in_window) * T + type``, the order of a ConvCaps weight.
    """
    b, h, w, types, e = grid.shape
    cut = grid.unfold(1, kernel, stride).unfold(2, kernel, stride)     # (B, Ho, Wo, T, E, K, K)
    cut = cut.permute(0, 1, 2, 5, 6, 3, 4)                             # (B, Ho, Wo, K, K, T, E)
    return cut.reshape(b, cut.shape[1], cut.shape[2], kernel * kernel * types, e)


def receptive_field_centres(size: int, layers: Sequence[tuple[int, ...]],
                            image_size: int) -> torch.Tensor:
    """Scaled centres of the receptive fields of a grid's rows (or columns), (size,) in (0, 1).

    ``layers`` lists the ``(kernel, stride)`` or ``(kernel, stride, padding)`` of every layer
    from the image up to the grid. Position ``p`` of a layer sees the inputs
    ``stride * p - padding ... stride * p - padding + kernel - 1``, whose centre is
    ``stride * p - padding + (kernel - 1) / 2``; going down to the image gives a pixel
    coordinate ``c``, scaled as ``(c + 0.5) / image_size`` (the centre of pixel c).
    """
    centres = torch.arange(size, dtype=torch.float64)
    for kernel, stride, *padding in reversed(layers):
        centres = stride * centres - sum(padding) + (kernel - 1) / 2
    return ((centres + 0.5) / image_size).float()


def coordinate_offsets(row_centres: torch.Tensor, column_centres: torch.Tensor,
                       types: int) -> torch.Tensor:
    """What coordinate addition adds to the votes of the class capsules: (H*W*T, 16).

    The child ``i = (row * W + column) * T + type`` gets its receptive field's scaled row centre
    added to entry (0, 3) and its column centre to entry (1, 3) of every vote, the first two
    elements of the right-hand column (the paper, section 3); the other 14 entries get 0.
    """
    h, w = len(row_centres), len(column_centres)
    offsets = row_centres.new_zeros(h, w, types, POSE_DIMS)            # (H, W, T, 16)
    offsets[..., ROW_ENTRY] = row_centres.view(h, 1, 1)
    offsets[..., COLUMN_ENTRY] = column_centres.view(1, w, 1)
    return offsets.reshape(h * w * types, POSE_DIMS)                   # (I, 16)


class PrimaryMatrixCaps(nn.Module):
    """Primary capsules: 1x1 convolutions give T types of 4x4 pose and sigmoid activation.

    (B, C, H, W) -> poses (B, H, W, T, 4, 4), activations (B, H, W, T).
    """

    def __init__(self, in_channels: int, types: int):
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * POSE_DIMS, kernel_size=1)
        self.activation = nn.Conv2d(in_channels, types, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        poses = self.pose(x).permute(0, 2, 3, 1)                       # (B, H, W, T*16)
        poses = poses.reshape(b, h, w, self.types, POSE_SIZE, POSE_SIZE)  # channel t*16 + d
        activations = torch.sigmoid(self.activation(x)).permute(0, 2, 3, 1)   # (B, H, W, T)
        return poses, activations


class _RoutedCaps(nn.Module):
    """Transformation matrices W (I, J, 4, 4) and the learned ``beta_u``, ``beta_a`` per parent
    type, shared by the convolutional and the class capsules. ``detach_intermediate`` is passed
    to :func:`em_routing` (chapter 08 compares both settings)."""

    def __init__(self, weights: int, parents: int, iterations: int, fan_in: int,
                 detach_intermediate: bool):
        super().__init__()
        self.iterations, self.detach_intermediate = iterations, detach_intermediate
        self.inverse_temperatures = None          # None: em_routing's default schedule
        # A parent's pose starts as the mean of ``fan_in`` disagreeing votes, each entry a sum of
        # 4 products: W entries of variance fan_in / 4 keep the poses' scale from layer to layer
        # (like a fan-in initialisation), so the variances in the routing's cost, and with them
        # the activations, start away from saturation. W is stored as ``weight * gain`` with
        # entries of standard deviation WEIGHT_SCALE, so that Adam's steps (about lr per entry)
        # change it by a fraction like that of the other parameters.
        self.gain = (fan_in / POSE_SIZE) ** 0.5 / WEIGHT_SCALE
        self.weight = nn.Parameter(WEIGHT_SCALE * torch.randn(weights, parents, POSE_SIZE,
                                                              POSE_SIZE))
        self.beta_u = nn.Parameter(torch.full((parents,), BETA_U_INIT))
        self.beta_a = nn.Parameter(torch.zeros(parents))

    @property
    def transforms(self) -> torch.Tensor:
        """The transformation matrices W the votes use: (weights, J, 4, 4)."""
        return self.weight * self.gain

    def route(self, votes: torch.Tensor, activations: torch.Tensor, grid: tuple[int, ...],
              return_assignments: bool):
        """EM routing of votes (R, J, I, 16) and child activations (R, I), R = prod(grid).

        Returns parent poses (*grid, J, 4, 4) and activations (*grid, J); with
        ``return_assignments`` also the assignments of every iteration, each (R, I, J).
        Rows route independently. When autograd records and the votes exceed
        ``ROUTING_CHUNK_BYTES``, the rows go through in chunks under activation checkpointing:
        each chunk's routing keeps nothing for the backward pass and is recomputed there, so
        the memory held for backpropagation through every iteration is one chunk's, not the
        layer's (the paper's ConvCaps1 at batch 32 would otherwise hold several GB). The
        results are those of a single call.
        """
        row_bytes = votes.shape[1:].numel() * votes.element_size()        # one row's votes
        rows_per_chunk = max(1, ROUTING_CHUNK_BYTES // row_bytes)
        if return_assignments or not torch.is_grad_enabled() or len(votes) <= rows_per_chunk:
            routed = self._em_routing(votes, activations, return_assignments)
        else:
            chunks = [checkpoint(self._em_routing, v, a, False, use_reentrant=False)
                      for v, a in zip(votes.split(rows_per_chunk), activations.split(rows_per_chunk))]
            routed = tuple(torch.cat(parts) for parts in zip(*chunks))  # (R, J, 16), (R, J)
        parents = votes.shape[1]
        poses = routed[0].reshape(*grid, parents, POSE_SIZE, POSE_SIZE)   # (*grid, J, 4, 4)
        out = (poses, routed[1].reshape(*grid, parents))                 # (*grid, J)
        return (*out, routed[2]) if return_assignments else out

    def _em_routing(self, votes: torch.Tensor, activations: torch.Tensor, return_assignments: bool):
        return em_routing(votes.transpose(1, 2), activations, self.beta_u, self.beta_a,
                          self.iterations, detach_intermediate=self.detach_intermediate,
                          inverse_temperatures=self.inverse_temperatures,
                          return_assignments=return_assignments)


class ConvCaps(_RoutedCaps):
    """Convolutional capsules: every K x K window of child capsules routes to J parent types.

    Weights ``W`` (K*K*T_in, J, 4, 4) are shared across positions, like a convolution's.
    poses (B, H, W, T_in, 4, 4), activations (B, H, W, T_in) -> poses (B, Ho, Wo, J, 4, 4),
    activations (B, Ho, Wo, J); with ``return_assignments`` also the routing's assignments,
    each (B*Ho*Wo, K*K*T_in, J).
    """

    def __init__(self, in_types: int, out_types: int, kernel: int = 3, stride: int = 1,
                 iterations: int = 3, detach_intermediate: bool = False):
        children = kernel * kernel * in_types
        super().__init__(children, out_types, iterations, children, detach_intermediate)
        self.kernel, self.stride, self.out_types = kernel, stride, out_types

    def forward(self, poses: torch.Tensor, activations: torch.Tensor,
                return_assignments: bool = False):
        b = poses.shape[0]
        pose_windows = windows(poses.flatten(-2), self.kernel, self.stride)   # (B, Ho, Wo, I, 16)
        _, ho, wo, children, _ = pose_windows.shape
        act_windows = windows(activations.unsqueeze(-1), self.kernel, self.stride)  # (B, Ho, Wo, I, 1)
        rows = b * ho * wo
        votes = transform_votes(pose_windows.reshape(rows, children, POSE_SIZE, POSE_SIZE),
                                self.transforms)                       # (R, J, I, 16)
        return self.route(votes, act_windows.reshape(rows, children), (b, ho, wo),
                          return_assignments)


class ClassCaps(_RoutedCaps):
    """Class capsules: every capsule of the grid below votes for each class.

    The transformation matrices W (T, J, 4, 4) are shared across positions: a child of type t
    uses ``W[t]`` wherever it is (``positions``, the grid's H*W, only sets the initial scale of
    W). With ``coordinate_offsets`` (I, 16) given, coordinate addition
    adds them to the votes, so the class poses still know where their parts were.
    poses (B, H, W, T, 4, 4), activations (B, H, W, T) -> poses (B, J, 4, 4), activations (B, J);
    with ``return_assignments`` also the assignments, each (B, H*W*T, J).
    """

    def __init__(self, in_types: int, classes: int = 10, iterations: int = 3, positions: int = 1,
                 detach_intermediate: bool = False):
        super().__init__(in_types, classes, iterations, positions * in_types, detach_intermediate)

    def forward(self, poses: torch.Tensor, activations: torch.Tensor,
                coordinate_offsets: torch.Tensor | None = None, return_assignments: bool = False):
        b, h, w, types = activations.shape
        children = h * w * types
        weight = self.transforms.repeat(h * w, 1, 1, 1)                # (I, J, 4, 4), shared
        votes = transform_votes(poses.reshape(b, children, POSE_SIZE, POSE_SIZE), weight)
        if coordinate_offsets is not None:
            votes = votes + coordinate_offsets                         # (B, J, I, 16)
        return self.route(votes, activations.reshape(b, children), (b,), return_assignments)
