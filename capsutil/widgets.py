"""Figures and the ipywidgets built on them, for the interactive chapters (Part I).

Every widget redraws one of the ``draw_*`` functions below, and each chapter also calls the
same function for the static figure that stands beside the widget in the published book,
where no kernel runs the sliders.
"""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Ellipse

from capsutil.em import BinomialMixture, log_binomial

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
