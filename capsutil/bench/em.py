"""Benchmark: our Gaussian-mixture EM against scikit-learn's, same data, start and iterations.

``python -m capsutil.bench em [--points N] [--components K] [--iterations T] [--repeats R]
[--covariance-type full|diag] [--threads P]`` draws N 2-D points from K Gaussians, picks one
starting point (uniform weights, K data points as means, the data's covariance for every
component), and fits both estimators for exactly T iterations (``tol=0`` never stops early).
It checks that both end at the same parameters, times R fits of each (alternating, so both see
the same load) and keeps the best, and prints both times and their ratio (ours / scikit-learn)
on the last line. ``--threads`` sets PyTorch's thread count for ours (default: PyTorch's own
choice); on a machine shared with other busy processes, ``--threads 1`` avoids waiting for a
descheduled worker thread at every parallel operation.

scikit-learn also runs one M-step on an initial assignment before overriding it with the given
start (``init_params``); that is part of its ``fit``, as the k-means assignment and one M-step
are part of ours.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from capsutil.em import GaussianMixture


def make_problem(n_points: int, n_components: int, seed: int):
    """Points from ``n_components`` random 2-D Gaussians and one shared starting point."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, size=(n_components, 2))             # (K, 2)
    factors = rng.normal(size=(n_components, 2, 2))                    # (K, 2, 2)
    covariances = factors @ factors.transpose(0, 2, 1) + 0.5 * np.eye(2)
    labels = rng.integers(n_components, size=n_points)                  # (N,)
    noise = np.einsum("nde,ne->nd", np.linalg.cholesky(covariances)[labels],
                      rng.normal(size=(n_points, 2)))                   # (N, 2)
    x = centres[labels] + noise
    start = {
        "weights_init": np.full(n_components, 1.0 / n_components),
        "means_init": x[rng.choice(n_points, n_components, replace=False)],
        "covariances_init": np.tile(np.cov(x.T), (n_components, 1, 1)),  # (K, 2, 2)
    }
    return x, start


def best_times(fits: dict, repeats: int) -> tuple[dict, dict]:
    """Time ``repeats`` calls of each fit, alternating between them so that both see the same
    load on a shared machine; return the best time (seconds) and the last model of each."""
    times = {name: [] for name in fits}
    models = {}
    for _ in range(repeats):
        for name, fit in fits.items():
            begin = time.perf_counter()
            models[name] = fit()
            times[name].append(time.perf_counter() - begin)
    return {name: min(values) for name, values in times.items()}, models


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m capsutil.bench em", description=__doc__)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--covariance-type", choices=("full", "diag"), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    x, start = make_problem(args.points, args.components, args.seed)
    kind = args.covariance_type
    covariances = start["covariances_init"]
    if kind == "diag":
        covariances = np.diagonal(covariances, axis1=1, axis2=2).copy()  # (K, 2)
    precisions = 1.0 / covariances if kind == "diag" else np.linalg.inv(covariances)

    def ours():
        return GaussianMixture(args.components, covariance_type=kind, tol=0.0,
                               max_iter=args.iterations, weights_init=start["weights_init"],
                               means_init=start["means_init"],
                               covariances_init=covariances).fit(x)

    def sklearn():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return SklearnGaussianMixture(args.components, covariance_type=kind, tol=0.0,
                                          max_iter=args.iterations,
                                          weights_init=start["weights_init"],
                                          means_init=start["means_init"],
                                          precisions_init=precisions,
                                          init_params="random_from_data",
                                          random_state=args.seed).fit(x)

    seconds, models = best_times({"ours": ours, "sklearn": sklearn}, args.repeats)
    ours_s, sklearn_s = seconds["ours"], seconds["sklearn"]
    model, reference = models["ours"], models["sklearn"]
    gap = max(np.abs(model.means_ - reference.means_).max(),
              np.abs(model.covariances_ - reference.covariances_).max(),
              np.abs(model.weights_ - reference.weights_).max())
    threads = torch.get_num_threads()
    print(f"GMM ({kind}) on {args.points:,} points, {args.components} components, 2-D, "
          f"{args.iterations} EM iterations, best of {args.repeats}; "
          f"torch {torch.__version__} with {threads} thread{'s' if threads > 1 else ''}")
    print(f"iterations run: ours {model.n_iter_}, scikit-learn {reference.n_iter_}; "
          f"largest parameter difference {gap:.1e}; mean log-likelihood ours "
          f"{model.score(x):.6f}, scikit-learn {reference.score(x):.6f}")
    print(f"ours {ours_s:.3f} s | scikit-learn {sklearn_s:.3f} s | "
          f"ratio (ours / scikit-learn) {ours_s / sklearn_s:.2f}")
