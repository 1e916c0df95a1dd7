"""Figures and the ipywidgets built on them, for the interactive chapters (01, 02 and 06).

Every widget redraws one of the ``draw_*`` functions below (or, in chapter 06, the decoder's
image), and each chapter also shows a static figure with the same insight beside the widget
in the published book, where no kernel runs the sliders. Chapter 06's explorer also exists as
plain HTML and JavaScript that needs no kernel: :mod:`capsutil.explorer`.
"""
from __future__ import annotations

import io
import math

import ipywidgets as widgets
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Ellipse, Rectangle
from torch import nn

from capsutil.em import BinomialMixture, log_binomial
from capsutil.explorer import decode_capsules, predicted_capsules

COMPONENT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


# ----------------------------------------------------------------------------------------------
# Chapter 01: two coins
# ----------------------------------------------------------------------------------------------

def coin_log_likelihood_grid(heads, n_trials: int, grid: np.ndarray) -> np.ndarray:
    """Marginal log-likelihood of two equally likely coins on a grid of (thetaA, thetaB).

    ``l(a, b) = sum_n log(1/2 Bin(h_n; n_trials, a) + 1/2 Bin(h_n; n_trials, b))``.
    heads: (N,); grid: (G,) values in (0, 1). Returns (G, G) indexed [b, a] (rows thetaB, as
    ``plt.contour`` expects).
    """
    log_p = log_binomial(torch.as_tensor(heads, dtype=torch.float64), n_trials,
                         torch.as_tensor(grid, dtype=torch.float64))    # (N, G)
    half = np.log(0.5)
    pairs = torch.logaddexp(half + log_p[:, None, :], half + log_p[:, :, None])  # (N, G_b, G_a)
    return pairs.sum(0).numpy()


def draw_coin_surface(ax, heads, n_trials: int, resolution: int = 101, levels: int = 25):
    """Contour of the coins' marginal log-likelihood over (thetaA, thetaB), with the diagonal.

    Returns the filled contour set (for a colour bar).
    """
    grid = np.linspace(0.01, 0.99, resolution)
    surface = coin_log_likelihood_grid(heads, n_trials, grid)
    floor = np.quantile(surface, 0.35)          # the flat, very unlikely corners stay blank
    filled = ax.contourf(grid, grid, np.maximum(surface, floor), levels=levels, cmap="viridis")
    ax.plot([0, 1], [0, 1], color="white", lw=1, ls="--", label=r"$\theta_A = \theta_B$")
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", xlabel=r"$\theta_A$",
           ylabel=r"$\theta_B$")
    return filled


def draw_em_path(ax, path: np.ndarray, colour: str = "white", label: str | None = None):
    """An EM path (T + 1, 2) of (thetaA, thetaB): start as a square, end as a star."""
    ax.plot(path[:, 0], path[:, 1], "-o", color=colour, ms=3, lw=1.2, label=label)
    ax.plot(*path[0], "s", color=colour, ms=7, mec="black")
    ax.plot(*path[-1], "*", color=colour, ms=14, mec="black")


def coin_em_path(heads, n_trials: int, start, max_iter: int = 200) -> np.ndarray:
    """EM path of the two coins (prior fixed at 1/2) from ``start``: (T + 1, 2)."""
    coins = BinomialMixture(2, n_trials=n_trials, thetas_init=start, fix_weights=True,
                            tol=1e-9, max_iter=max_iter).fit(heads)
    return coins.history_["thetas"]


def coin_em_explorer(heads, n_trials: int, resolution: int = 101) -> widgets.Widget:
    """Sliders for the starting (thetaA, thetaB); draws EM's path on the log-likelihood contour."""
    slider = dict(min=0.02, max=0.98, step=0.02, continuous_update=False, readout_format=".2f")
    theta_a = widgets.FloatSlider(value=0.6, description="start θA", **slider)
    theta_b = widgets.FloatSlider(value=0.5, description="start θB", **slider)

    def redraw(start_a: float, start_b: float) -> None:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        draw_coin_surface(ax, heads, n_trials, resolution)
        path = coin_em_path(heads, n_trials, [start_a, start_b])
        draw_em_path(ax, path, colour="tab:red")
        ax.set_title(f"EM from ({start_a:.2f}, {start_b:.2f}) ends at "
                     f"({path[-1, 0]:.2f}, {path[-1, 1]:.2f}) after {len(path) - 1} steps")
        plt.show()

    output = widgets.interactive_output(redraw, {"start_a": theta_a, "start_b": theta_b})
    return widgets.VBox([widgets.HBox([theta_a, theta_b]), output])


# ----------------------------------------------------------------------------------------------
# Chapter 02: Gaussian mixtures
# ----------------------------------------------------------------------------------------------

def covariance_ellipse(mean, covariance, n_std: float = 2.0, **style) -> Ellipse:
    """The ellipse ``(x - mu)^T Sigma^{-1} (x - mu) = n_std^2`` of a 2-D Gaussian.

    covariance: (2, 2), or (2,) variances of a diagonal Gaussian.
    """
    covariance = np.asarray(covariance, dtype=float)
    if covariance.shape == (2,):
        covariance = np.diag(covariance)
    if covariance.shape != (2, 2):
        raise ValueError(f"expected a 2-D covariance of shape (2, 2) or (2,), "
                         f"got {covariance.shape}")
    variances, axes = np.linalg.eigh(covariance)                       # ascending
    angle = np.degrees(np.arctan2(axes[1, 1], axes[0, 1]))              # of the major axis
    width, height = 2 * n_std * np.sqrt(variances[::-1])
    return Ellipse(mean, width, height, angle=angle, fill=False, **style)


def draw_gmm_state(ax, x: np.ndarray, weights, means, covariances, labels=None,
                   title: str | None = None):
    """Points and each component's 1- and 2-sigma ellipses, line width growing with its weight."""
    ax.scatter(x[:, 0], x[:, 1], s=4, alpha=0.35,
               c="grey" if labels is None else np.asarray(COMPONENT_COLOURS)[labels])
    for k, (weight, mean, covariance) in enumerate(zip(weights, means, covariances)):
        colour = COMPONENT_COLOURS[k % len(COMPONENT_COLOURS)]
        for n_std in (1.0, 2.0):
            ax.add_patch(covariance_ellipse(mean, covariance, n_std, color=colour,
                                            lw=1 + 4 * weight))
        ax.plot(*mean, "x", color=colour, ms=9, mew=2)
    ax.set(aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    if title:
        ax.set_title(title)


def gmm_iteration_explorer(x: np.ndarray, gmm, limits=None) -> widgets.Widget:
    """A slider over the EM iterations of a fitted ``capsutil.em.GaussianMixture``."""
    history = gmm.history_
    limits = limits or (x[:, 0].min() - 1, x[:, 0].max() + 1, x[:, 1].min() - 1, x[:, 1].max() + 1)
    step = widgets.IntSlider(value=0, min=0, max=gmm.n_iter_, description="iteration",
                             continuous_update=False)

    def redraw(t: int) -> None:
        fig, ax = plt.subplots(figsize=(6, 5))
        draw_gmm_state(ax, x, history["weights"][t], history["means"][t],
                       history["covariances"][t],
                       title=f"iteration {t}: log-likelihood {gmm.log_likelihoods_[t]:,.1f}")
        ax.set(xlim=limits[:2], ylim=limits[2:])
        plt.show()

    return widgets.VBox([step, widgets.interactive_output(redraw, {"t": step})])


# ----------------------------------------------------------------------------------------------
# Chapter 06: what the pose parameters encode
# ----------------------------------------------------------------------------------------------

PAPER_OFFSETS = np.round(np.linspace(-0.25, 0.25, 11), 2)   # Sabour et al. (2017), figure 4


@torch.no_grad()
def pose_sweep(decoder: nn.Module, poses: torch.Tensor, classes: torch.Tensor,
               offsets=PAPER_OFFSETS) -> torch.Tensor:
    """Decode each capsule with one pose dimension at a time moved by each offset.

    poses: (N, E) capsules; classes: int64 (N,) the class each is decoded as; offsets: (S,).
    Returns (N, E, S, pixels): entry [n, e, s] decodes ``poses[n] + offsets[s] * unit_e``, the
    other E - 1 dimensions unchanged (Sabour et al. 2017, section 5.1 and figure 4).
    """
    offsets = torch.as_tensor(np.asarray(offsets, dtype=np.float32), device=poses.device)
    if offsets.dim() != 1 or len(offsets) == 0:
        raise ValueError(f"expected a non-empty 1-D list of offsets, got shape {tuple(offsets.shape)}")
    if poses.dim() != 2:
        raise ValueError(f"expected poses of shape (N, E), got {tuple(poses.shape)}")
    n, dims = poses.shape
    steps = len(offsets)
    moves = torch.eye(dims, device=poses.device)[:, None, :] * offsets[None, :, None]  # (E, S, E)
    tweaked = poses[:, None, None, :] + moves[None]                                    # (N, E, S, E)
    repeated = classes[:, None].expand(n, dims * steps).reshape(-1)                    # (N*E*S,)
    images = decode_capsules(decoder, tweaked.reshape(-1, dims), repeated)             # (N*E*S, P)
    return images.reshape(n, dims, steps, -1)                                          # (N, E, S, P)


def draw_pose_grid(ax, grid, offsets=PAPER_OFFSETS, title: str | None = None, gap: int = 2):
    """One digit's sweep as a mosaic: row e = pose dimension e, column s = offset s.

    grid: (E, S, pixels) or (E, S, H, W) images in [0, 1], e.g. one entry of :func:`pose_sweep`.
    Drawn with ``cmap="binary"``; the unchanged capsule (offset 0) is outlined in red.
    """
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim not in (3, 4) or grid.shape[1] != len(offsets):
        raise ValueError(f"expected images of shape (E, {len(offsets)}, pixels), got {grid.shape}")
    dims, steps = grid.shape[:2]
    side = math.isqrt(int(np.prod(grid.shape[2:])))
    tiles = grid.reshape(dims, steps, side, side)                       # (E, S, H, W)
    pitch = side + gap
    mosaic = np.full((dims * pitch - gap, steps * pitch - gap), np.nan, dtype=np.float32)
    for e in range(dims):
        for s in range(steps):
            mosaic[e * pitch:e * pitch + side, s * pitch:s * pitch + side] = tiles[e, s]
    cmap = plt.get_cmap("binary").with_extremes(bad="#c8c8c8")          # grey gaps between tiles
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    centres = np.arange(max(dims, steps)) * pitch + side / 2 - 0.5
    ax.set_xticks(centres[:steps], [f"{o:+.2f}" for o in offsets], rotation=90, fontsize=7)
    ax.set_yticks(centres[:dims], [str(e) for e in range(dims)], fontsize=7)
    zero = int(np.argmin(np.abs(np.asarray(offsets))))
    ax.add_patch(Rectangle((zero * pitch - 1.5, -1.5), side + 2, dims * pitch - gap + 2,
                           fill=False, edgecolor="tab:red", lw=1))
    ax.set(xlabel="offset added to the dimension", ylabel="pose dimension")
    if title:
        ax.set_title(title, fontsize=10)


def _png(image: np.ndarray, scale: int) -> bytes:
    """A (side, side) image in [0, 1] as PNG bytes, ``cmap="binary"``, each pixel scale x scale."""
    big = np.kron(np.asarray(image, dtype=np.float32), np.ones((scale, scale), np.float32))
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, big, cmap="binary", vmin=0, vmax=1, format="png")
    return buffer.getvalue()


class PoseExplorer(widgets.VBox):
    """The Jupyter pose explorer of chapter 06.

    A digit chooser, one slider per pose dimension ("dimension 3") adding an offset in
    [-limit, limit] to it, and a reset button; every change re-decodes the predicted capsule
    through ``model.decoder`` and redraws. model: a CapsNet; images: float (N, 1, H, W) in
    [0, 1]; names: N captions for the chooser. ``reconstruction`` holds the latest decoded image
    (H, W) as a NumPy array; ``pose()`` the capsule (E,) it was decoded from.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, names: list[str] | None = None,
                 limit: float = 0.5, step: float = 0.01, scale: int = 8):
        if not 0 < step <= limit:
            raise ValueError(f"expected 0 < step <= limit, got step {step!r}, limit {limit!r}")
        self.model, self.scale = model, scale
        self.images = images.detach().cpu()
        self.poses, self.classes = predicted_capsules(model, images)      # (N, E), (N,)
        names = [f"example {k}" for k in range(len(images))] if names is None else list(names)
        if len(names) != len(images):
            raise ValueError(f"expected {len(images)} names, got {len(names)}")
        self.side = self.images.shape[-1]
        self.digit = widgets.Dropdown(options=[(name, k) for k, name in enumerate(names)],
                                      description="test digit")
        self.sliders = [widgets.FloatSlider(value=0.0, min=-limit, max=limit, step=step,
                                            description=f"dimension {e}", readout_format="+.2f",
                                            continuous_update=True,
                                            style={"description_width": "90px"})
                        for e in range(self.poses.shape[1])]
        self.reset_button = widgets.Button(description="reset all dimensions to 0")
        self.input_image, self.output_image = widgets.Image(format="png"), widgets.Image(format="png")
        self.status = widgets.Label()
        self.reconstruction = np.zeros((self.side, self.side), np.float32)
        self._holding = False
        for slider in self.sliders:
            slider.observe(self._changed, names="value")
        self.digit.observe(self._digit_changed, names="value")
        self.reset_button.on_click(self.reset)
        pictures = widgets.HBox([
            widgets.VBox([self.input_image, widgets.Label("input")]),
            widgets.VBox([self.output_image, widgets.Label("decoded from the capsule")]),
            widgets.VBox([self.digit, self.reset_button, self.status])])
        grid = widgets.GridBox(self.sliders, layout=widgets.Layout(
            grid_template_columns="repeat(2, minmax(320px, 1fr))"))
        super().__init__([pictures, grid])
        self._digit_changed()

    def offsets(self) -> torch.Tensor:
        """The sliders' offsets (E,), float32."""
        return torch.tensor([slider.value for slider in self.sliders], dtype=torch.float32)

    def pose(self) -> torch.Tensor:
        """The chosen digit's capsule plus the sliders' offsets, (E,)."""
        return self.poses[self.digit.value] + self.offsets().to(self.poses.device)

    def redraw(self) -> None:
        """Decode the current pose and show it."""
        k = self.digit.value
        pixels = decode_capsules(self.model.decoder, self.pose()[None], self.classes[k:k + 1])
        self.reconstruction = pixels[0].cpu().numpy().reshape(self.side, self.side)
        self.output_image.value = _png(self.reconstruction, self.scale)
        self.status.value = (f"decoded as class {int(self.classes[k])}; capsule length "
                             f"{float(self.pose().norm()):.3f}")

    def reset(self, *_) -> None:
        """Put every slider back to 0 and redraw once."""
        self._holding = True
        try:
            for slider in self.sliders:
                slider.value = 0.0
        finally:
            self._holding = False
        self.redraw()

    def _changed(self, _change=None) -> None:
        if not self._holding:
            self.redraw()

    def _digit_changed(self, _change=None) -> None:
        image = self.images[self.digit.value].reshape(self.side, self.side)
        self.input_image.value = _png(image.numpy(), self.scale)
        self.redraw()
