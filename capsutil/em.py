"""Expectation-maximisation for mixture models (Part I: chapters 01 and 02).

Each step is a small pure function on float64 tensors, so the chapters (and chapter 07's EM
routing) can call one step at a time:

- E-step: a component log-density (``log_binomial``, ``log_gaussian_diag``,
  ``log_gaussian_full``) followed by ``log_responsibilities``, all in the log domain with
  log-sum-exp, so points far from every component never underflow to ``0 / 0``.
- M-step: ``m_step_binomial``, ``m_step_diag``, ``m_step_full``.
- k-means, the hard-assignment relative: ``kmeans_assign`` and ``kmeans_update``.

The estimators ``BinomialMixture``, ``GaussianMixture`` and ``KMeans`` iterate those steps and
follow scikit-learn's contract: hyper-parameters in ``__init__``, ``fit`` returns ``self``,
learned state in trailing-underscore attributes (NumPy arrays), input validated at the boundary.
Each fit also keeps the parameters after every iteration (``history_``) and the marginal
log-likelihood of every iteration (``log_likelihoods_``) so the chapters can plot the path.

Index letters: ``n`` data point, ``k`` mixture component (or cluster), ``d``/``e`` feature.
"""
from __future__ import annotations

import math

import numpy as np
import torch

DTYPE = torch.float64
LOG_2PI = math.log(2.0 * math.pi)
# Added to every component's total responsibility so that an empty component cannot divide by zero
# (the same guard as scikit-learn's GaussianMixture).
EMPTY_COMPONENT_GUARD = 10.0 * torch.finfo(DTYPE).eps
COVARIANCE_TYPES = ("full", "diag")


# ----------------------------------------------------------------------------------------------
# Checks of the values the steps take
# ----------------------------------------------------------------------------------------------

def _check_probabilities(p: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless every entry of ``p`` is in [0, 1] (NaN is not). Meta tensors
    (shapes without values) have nothing to check."""
    if p.numel() and not p.is_meta and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"expected {name} in [0, 1], got values from {p.min().item():.4g} "
                         f"to {p.max().item():.4g}")


def _check_positive(values: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless every entry of ``values`` is positive (NaN is not). Meta
    tensors (shapes without values) have nothing to check."""
    if values.numel() and not values.is_meta and not bool((values > 0).all()):
        raise ValueError(f"expected positive {name}, got a smallest value of "
                         f"{values.min().item():.4g}")


# ----------------------------------------------------------------------------------------------
# E-step
# ----------------------------------------------------------------------------------------------

def log_binomial(heads: torch.Tensor, n_trials: int, thetas: torch.Tensor) -> torch.Tensor:
    """Binomial log-probability of each experiment's heads under each coin (chapter 01).

    ``log p(h_n | theta_k) = log C(n_trials, h_n) + h_n log theta_k
    + (n_trials - h_n) log(1 - theta_k)``.
    heads: (N,) counts; thetas: (K,) heads probabilities in [0, 1]. Returns (N, K). ``xlogy``
    makes ``0 * log 0 = 0``, so a coin with theta 0 or 1 is allowed.
    """
    if heads.dim() != 1 or thetas.dim() != 1:
        raise ValueError(f"expected heads of shape (N,) and thetas of shape (K,), "
                         f"got {tuple(heads.shape)} and {tuple(thetas.shape)}")
    _check_probabilities(thetas, "thetas")
    h = heads[:, None]                                                  # (N, 1)
    log_choose = (math.lgamma(n_trials + 1) - torch.lgamma(h + 1)
                  - torch.lgamma(n_trials - h + 1))                     # (N, 1)
    return log_choose + torch.xlogy(h, thetas) + torch.xlogy(n_trials - h, 1.0 - thetas)


def log_gaussian_diag(x: torch.Tensor, means: torch.Tensor,
                      variances: torch.Tensor) -> torch.Tensor:
    """Log-density of every point under every axis-aligned Gaussian (chapters 02 and 07).

    ``log N(x_n | mu_k, diag(sigma_k^2)) = -1/2 sum_d [log(2 pi) + log sigma_kd^2
    + (x_nd - mu_kd)^2 / sigma_kd^2]``.
    x: (..., N, D); means and variances (positive): (..., K, D); leading batch dimensions
    broadcast. Returns (..., N, K). Inside, the points run along the last axis, (..., K, D, N),
    so the sum over d adds long contiguous rows (summing a short last axis is several times
    slower).
    """
    if x.shape[-1] != means.shape[-1] or means.shape != variances.shape:
        raise ValueError(f"expected x (..., N, D), means and variances (..., K, D), got "
                         f"{tuple(x.shape)}, {tuple(means.shape)} and {tuple(variances.shape)}")
    _check_positive(variances, "variances")
    points = x.transpose(-1, -2).contiguous().unsqueeze(-3)             # (..., 1, D, N)
    z = (points - means.unsqueeze(-1)) / variances.sqrt().unsqueeze(-1)   # (..., K, D, N)
    log_det = torch.log(variances).sum(-1, keepdim=True)                # (..., K, 1)
    log_prob = -0.5 * (x.shape[-1] * LOG_2PI + log_det + z.square().sum(-2))  # (..., K, N)
    return log_prob.transpose(-1, -2)                                   # (..., N, K)


def log_gaussian_full(x: torch.Tensor, means: torch.Tensor,
                      covariances: torch.Tensor) -> torch.Tensor:
    """Log-density of every point under every full-covariance Gaussian (chapter 02).

    With the Cholesky factor ``Sigma_k = L_k L_k^T`` and the whitened point
    ``z_nk = L_k^{-1} (x_n - mu_k)``:
    ``log N(x_n | mu_k, Sigma_k) = -1/2 [D log(2 pi) + log det Sigma_k + |z_nk|^2]``,
    with ``log det Sigma_k = 2 sum_d log L_kdd``; only the small triangular ``L_k`` is inverted.
    x: (N, D); means: (K, D); covariances: (K, D, D). Returns (N, K); inside, the points run
    along the last axis, (K, D, N), as in ``log_gaussian_diag``.
    Raises ``ValueError`` if a covariance is not positive definite.
    """
    if x.dim() != 2 or means.dim() != 2 or means.shape[1] != x.shape[1] \
            or covariances.shape != (*means.shape, x.shape[1]):
        raise ValueError(f"expected x (N, D), means (K, D), covariances (K, D, D), got "
                         f"{tuple(x.shape)}, {tuple(means.shape)} and {tuple(covariances.shape)}")
    k, d = means.shape
    chol, info = torch.linalg.cholesky_ex(covariances)                  # (K, D, D), lower
    if bool((info != 0).any()):
        bad = int(torch.nonzero(info)[0, 0])
        raise ValueError(f"expected positive-definite covariances, covariances[{bad}] is not")
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand_as(chol)  # (K, D, D)
    chol_inv = torch.linalg.solve_triangular(chol, eye, upper=False)    # (K, D, D), L_k^{-1}
    z = (chol_inv.reshape(k * d, d) @ x.T).view(k, d, -1) \
        - chol_inv @ means.unsqueeze(-1)                                # (K, D, N)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)   # (K,)
    log_prob = -0.5 * (d * LOG_2PI + log_det.unsqueeze(-1) + z.square().sum(1))  # (K, N)
    return log_prob.T                                                   # (N, K)


def log_responsibilities(log_prob: torch.Tensor, log_weights: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step in the log domain: posterior of each component for each point (chapters 01, 02, 07).

    ``log r_nk = log pi_k + log p(x_n | k) - log sum_j pi_j p(x_n | j)``, the normaliser by
    log-sum-exp (subtract the row maximum before exponentiating).
    log_prob: (..., N, K) component log-densities; log_weights: (..., K) log mixing weights.
    Returns ``(log_resp, log_evidence)``: (..., N, K) log-responsibilities and (..., N) the
    marginal log-likelihood ``log p(x_n)`` of each point.
    """
    if log_prob.shape[-1] != log_weights.shape[-1]:
        raise ValueError(f"expected log_weights with {log_prob.shape[-1]} components, "
                         f"got shape {tuple(log_weights.shape)}")
    joint = log_prob + log_weights.unsqueeze(-2)                        # (..., N, K)
    log_evidence = torch.logsumexp(joint, dim=-1)                       # (..., N)
    return joint - log_evidence.unsqueeze(-1), log_evidence


# ----------------------------------------------------------------------------------------------
# M-step
# ----------------------------------------------------------------------------------------------

def _component_totals(resp: torch.Tensor) -> torch.Tensor:
    """``N_k = sum_n r_nk`` (plus the empty-component guard): (..., N, K) -> (..., K), after
    checking that the responsibilities are probabilities."""
    _check_probabilities(resp, "responsibilities resp")
    return resp.sum(-2) + EMPTY_COMPONENT_GUARD


def m_step_binomial(heads: torch.Tensor, n_trials: int, resp: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """M-step for a mixture of binomials (chapter 01): expected heads over expected tosses.

    ``theta_k = sum_n r_nk h_n / (n_trials sum_n r_nk)``, ``pi_k = sum_n r_nk / N``.
    heads: (N,); resp: (N, K). Returns ``(weights, thetas)``, each (K,).
    """
    if resp.dim() != 2 or heads.shape != resp.shape[:1]:
        raise ValueError(f"expected heads (N,) and resp (N, K), got {tuple(heads.shape)} "
                         f"and {tuple(resp.shape)}")
    totals = _component_totals(resp)                                    # (K,)
    thetas = (resp * heads[:, None]).sum(0) / (n_trials * totals)       # (K,)
    return totals / totals.sum(), thetas


def m_step_diag(x: torch.Tensor, resp: torch.Tensor, reg_covar: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step for axis-aligned Gaussians (chapter 02, used by chapter 07).

    ``N_k = sum_n r_nk``, ``pi_k = N_k / N``, ``mu_k = sum_n r_nk x_n / N_k``,
    ``sigma_kd^2 = sum_n r_nk (x_nd - mu_kd)^2 / N_k + reg_covar``.
    x: (..., N, D); resp: (..., N, K); leading batch dimensions broadcast.
    Returns ``(weights, means, variances)``: (..., K), (..., K, D), (..., K, D).
    """
    if x.shape[:-1] != resp.shape[:-1]:
        raise ValueError(f"expected x (..., N, D) and resp (..., N, K) with the same N, got "
                         f"{tuple(x.shape)} and {tuple(resp.shape)}")
    totals = _component_totals(resp)                                    # (..., K)
    resp_t = resp.transpose(-1, -2)                                     # (..., K, N)
    means = resp_t @ x / totals.unsqueeze(-1)                           # (..., K, D)
    points = x.transpose(-1, -2).contiguous().unsqueeze(-3)             # (..., 1, D, N)
    diff = points - means.unsqueeze(-1)                                 # (..., K, D, N)
    variances = (diff.square() * resp_t.unsqueeze(-2)).sum(-1) / totals.unsqueeze(-1)  # (..., K, D)
    weights = totals / totals.sum(-1, keepdim=True)                     # (..., K)
    return weights, means, variances + reg_covar


def m_step_full(x: torch.Tensor, resp: torch.Tensor, reg_covar: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M-step for full-covariance Gaussians (chapter 02).

    As ``m_step_diag`` with ``Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k
    + reg_covar I``. x: (N, D); resp: (N, K).
    Returns ``(weights, means, covariances)``: (K,), (K, D), (K, D, D).
    """
    if x.dim() != 2 or resp.dim() != 2 or x.shape[0] != resp.shape[0]:
        raise ValueError(f"expected x (N, D) and resp (N, K), got {tuple(x.shape)} "
                         f"and {tuple(resp.shape)}")
    totals = _component_totals(resp)                                    # (K,)
    resp_t = resp.T                                                     # (K, N)
    means = resp_t @ x / totals[:, None]                                # (K, D)
    diff = x.T.contiguous().unsqueeze(0) - means.unsqueeze(-1)          # (K, D, N)
    covariances = (diff * resp_t.unsqueeze(1)) @ diff.transpose(1, 2)   # (K, D, D)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    return totals / totals.sum(), means, covariances / totals[:, None, None] + reg_covar * eye


# ----------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------

def kmeans_assign(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard assignment (chapter 02): each point goes to its nearest centre.

    x: (N, D); centres: (K, D). Returns ``(labels, sq_dist)``: (N,) int64 and (N,) the squared
    distance to the chosen centre. Ties go to the lower index.
    """
    if x.dim() != 2 or centres.dim() != 2 or x.shape[1] != centres.shape[1]:
        raise ValueError(f"expected x (N, D) and centres (K, D), got {tuple(x.shape)} "
                         f"and {tuple(centres.shape)}")
    diff = x[:, None, :] - centres                                      # (N, K, D)
    sq_dist, labels = (diff * diff).sum(-1).min(dim=1)                  # (N,), (N,)
    return labels, sq_dist


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Move each centre to the mean of its points (chapter 02); an empty cluster keeps its centre.

    x: (N, D); labels: (N,) int64; centres: (K, D) the current centres. Returns (K, D).
    """
    one_hot = torch.nn.functional.one_hot(labels, centres.shape[0]).to(x.dtype)   # (N, K)
    counts = one_hot.sum(0)                                             # (K,)
    sums = one_hot.T @ x                                                # (K, D)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)


# ----------------------------------------------------------------------------------------------
# Input checks shared by the estimators
# ----------------------------------------------------------------------------------------------

def _as_array(values, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"expected {name} as an array of numbers: {error}") from None
    if not np.isfinite(array).all():
        count = int((~np.isfinite(array)).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({count} entries)")
    return array


def _check_points(X, n_features: int | None = None) -> torch.Tensor:
    """Data as a float64 tensor (N, D); ``n_features`` is the D seen in ``fit``."""
    array = _as_array(X, "data")
    if array.ndim != 2:
        raise ValueError(f"expected data of shape (n_points, n_features), got shape {array.shape}")
    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(f"expected data with {n_features} features (as in fit), "
                         f"got {array.shape[1]}")
    return torch.from_numpy(array)


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"expected {name} to be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_enough_points(n_points: int, n_groups: int, name: str = "n_components") -> None:
    if n_points < n_groups:
        raise ValueError(f"expected at least {name}={n_groups} points, got {n_points}")


def _check_shape(array: np.ndarray, shape: tuple, name: str) -> None:
    if array.shape != shape:
        raise ValueError(f"expected {name} of shape {shape}, got {array.shape}")


def _check_weights(weights, n_components: int) -> torch.Tensor:
    array = _as_array(weights, "weights_init")
    _check_shape(array, (n_components,), "weights_init")
    if (array < 0).any() or not np.isclose(array.sum(), 1.0):
        raise ValueError(f"expected weights_init to be non-negative and sum to 1, got {array}")
    return torch.from_numpy(array)


def _stack_history(history: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    return {name: torch.stack([step[name] for step in history]).numpy() for name in history[0]}


# ----------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------

class _Mixture:
    """The EM loop shared by the mixtures: alternate E and M steps, record every iteration.

    Subclasses provide ``_check_data``, ``_initial_params``, ``_log_prob`` and ``_m_step`` on
    a dict of parameter tensors that always holds ``"weights"``.

    Stopping rule (scikit-learn's, so both stop at the same iteration from the same start):
    iteration t runs an E-step at the current parameters, which gives their mean
    log-likelihood per point, then an M-step; EM stops after iteration t when that mean
    rose by less than ``tol`` since iteration t - 1's E-step, or after ``max_iter`` iterations.
    """

    def __init__(self, n_components: int, *, tol: float, max_iter: int, weights_init,
                 fix_weights: bool, random_state: int | None):
        self.n_components = n_components
        self.tol = tol
        self.max_iter = max_iter
        self.weights_init = weights_init
        self.fix_weights = fix_weights
        self.random_state = random_state

    def _check_settings(self) -> None:
        _check_count(self.n_components, "n_components")
        _check_count(self.max_iter, "max_iter", minimum=0)
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0):
            raise ValueError(f"expected a non-negative tol, got {self.tol!r}")

    def fit(self, X) -> "_Mixture":
        """Run EM on ``X`` from the initial parameters; return ``self``.

        Sets the parameter attributes, ``converged_``, ``n_iter_``, ``log_likelihoods_``
        ((n_iter_ + 1,): the total marginal log-likelihood ``sum_n log p(x_n)`` at the start and
        after each iteration) and ``history_`` (each parameter at the start and after each
        iteration, stacked on a new first axis of length n_iter_ + 1).
        """
        self._check_settings()
        x = self._check_data(X, fitting=True)
        _check_enough_points(x.shape[0], self.n_components)
        params = self._initial_params(x)
        history, log_likelihoods = [params], []
        self.converged_ = False
        for _ in range(self.max_iter):
            log_resp, log_evidence = self._e_step(x, params)
            log_likelihoods.append(float(log_evidence.sum()))
            params = self._m_step(x, log_resp.exp())
            if self.fix_weights:
                params["weights"] = history[0]["weights"]
            history.append(params)
            if len(log_likelihoods) > 1 and \
                    abs(log_likelihoods[-1] - log_likelihoods[-2]) / x.shape[0] < self.tol:
                self.converged_ = True
                break
        log_likelihoods.append(float(self._e_step(x, params)[1].sum()))
        self.n_iter_ = len(history) - 1
        self.log_likelihoods_ = np.array(log_likelihoods)
        self.history_ = _stack_history(history)
        self._params = params
        for name, value in params.items():
            setattr(self, f"{name}_", value.numpy())
        return self

    def _e_step(self, x: torch.Tensor, params: dict[str, torch.Tensor]):
        return log_responsibilities(self._log_prob(x, params), torch.log(params["weights"]))

    def _fitted_e_step(self, X):
        if not hasattr(self, "_params"):
            raise ValueError(f"this {type(self).__name__} is not fitted yet; call fit first")
        return self._e_step(self._check_data(X, fitting=False), self._params)

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities ``p(component k | x_n)``: (N, K), rows sum to 1."""
        return self._fitted_e_step(X)[0].exp().numpy()

    def predict(self, X) -> np.ndarray:
        """The most probable component of each point: (N,) int64."""
        return self._fitted_e_step(X)[0].argmax(-1).numpy()

    def score_samples(self, X) -> np.ndarray:
        """Marginal log-likelihood ``log p(x_n)`` of each point: (N,)."""
        return self._fitted_e_step(X)[1].numpy()

    def score(self, X) -> float:
        """Mean marginal log-likelihood per point (as scikit-learn's ``score``)."""
        return float(self._fitted_e_step(X)[1].mean())


class BinomialMixture(_Mixture):
    """A mixture of K coins, each tossed ``n_trials`` times per experiment (chapter 01).

    The data are the heads of each experiment, shape (N,). Learned: ``weights_`` (K,) the
    probability of picking each coin and ``thetas_`` (K,) their heads probabilities.
    ``fix_weights=True`` keeps the weights at ``weights_init`` (uniform by default), as in the
    classic example of Do & Batzoglou (2008), where each coin is picked with probability 1/2.
    Without ``thetas_init``, the start is drawn uniformly from (0.1, 0.9) with ``random_state``.
    """

    def __init__(self, n_components: int = 2, *, n_trials: int, tol: float = 1e-6,
                 max_iter: int = 100, weights_init=None, thetas_init=None,
                 fix_weights: bool = False, random_state: int | None = None):
        super().__init__(n_components, tol=tol, max_iter=max_iter, weights_init=weights_init,
                         fix_weights=fix_weights, random_state=random_state)
        self.n_trials = n_trials
        self.thetas_init = thetas_init

    def _check_data(self, X, fitting: bool) -> torch.Tensor:
        n_trials = _check_count(self.n_trials, "n_trials")
        heads = _as_array(X, "heads")
        if heads.ndim != 1:
            raise ValueError(f"expected heads of shape (n_experiments,), got shape {heads.shape}")
        if (heads < 0).any() or (heads > n_trials).any() or (heads != np.round(heads)).any():
            raise ValueError(f"expected whole numbers of heads between 0 and n_trials={n_trials}, "
                             f"got {heads}")
        return torch.from_numpy(heads)

    def _initial_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        k = self.n_components
        weights = (torch.full((k,), 1.0 / k, dtype=DTYPE) if self.weights_init is None
                   else _check_weights(self.weights_init, k))
        if self.thetas_init is None:
            thetas = torch.from_numpy(np.random.default_rng(self.random_state).uniform(0.1, 0.9, k))
        else:
            array = _as_array(self.thetas_init, "thetas_init")
            _check_shape(array, (k,), "thetas_init")
            if ((array <= 0) | (array >= 1)).any():
                raise ValueError(f"expected thetas_init strictly between 0 and 1, got {array}")
            thetas = torch.from_numpy(array)
        return {"weights": weights, "thetas": thetas}

    def _log_prob(self, x, params):
        return log_binomial(x, self.n_trials, params["thetas"])

    def _m_step(self, x, resp):
        weights, thetas = m_step_binomial(x, self.n_trials, resp)
        return {"weights": weights, "thetas": thetas}


class GaussianMixture(_Mixture):
    """A mixture of K Gaussians fitted by EM (chapter 02), scikit-learn's contract.

    ``covariance_type`` is ``"full"`` (``covariances_`` (K, D, D)) or ``"diag"``
    (``covariances_`` (K, D), the variances). ``reg_covar`` is added to every variance in each
    M-step, as in scikit-learn. Starting values: ``weights_init`` (K,), ``means_init`` (K, D),
    ``covariances_init`` ((K, D, D) or (K, D)); whatever is not given comes from one M-step on
    the hard assignment of the points to the nearest initial mean, those means being
    ``means_init`` or else the centres found by ``KMeans(random_state=random_state)``.
    """

    def __init__(self, n_components: int = 1, *, covariance_type: str = "full",
                 tol: float = 1e-3, reg_covar: float = 1e-6, max_iter: int = 100,
                 weights_init=None, means_init=None, covariances_init=None,
                 fix_weights: bool = False, random_state: int | None = None):
        super().__init__(n_components, tol=tol, max_iter=max_iter, weights_init=weights_init,
                         fix_weights=fix_weights, random_state=random_state)
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.means_init = means_init
        self.covariances_init = covariances_init

    def _check_settings(self) -> None:
        super()._check_settings()
        if self.covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"expected covariance_type in {COVARIANCE_TYPES}, "
                             f"got {self.covariance_type!r}")
        if not (isinstance(self.reg_covar, (int, float)) and self.reg_covar >= 0):
            raise ValueError(f"expected a non-negative reg_covar, got {self.reg_covar!r}")

    def _check_data(self, X, fitting: bool) -> torch.Tensor:
        x = _check_points(X, None if fitting else self.n_features_in_)
        if fitting:
            self.n_features_in_ = x.shape[1]
        return x

    def _initial_params(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        k, d = self.n_components, x.shape[1]
        if self.means_init is None:
            centres = torch.from_numpy(
                KMeans(k, random_state=self.random_state).fit(x.numpy()).cluster_centers_)
        else:
            means = _as_array(self.means_init, "means_init")
            _check_shape(means, (k, d), "means_init")
            centres = torch.from_numpy(means)
        labels, _ = kmeans_assign(x, centres)
        resp = torch.nn.functional.one_hot(labels, k).to(DTYPE)        # (N, K)
        params = self._m_step(x, resp)
        params["means"] = centres
        if self.weights_init is not None:
            params["weights"] = _check_weights(self.weights_init, k)
        if self.covariances_init is not None:
            params["covariances"] = self._check_covariances(self.covariances_init, k, d)
        return params

    def _check_covariances(self, covariances, k: int, d: int) -> torch.Tensor:
        array = _as_array(covariances, "covariances_init")
        if self.covariance_type == "diag":
            _check_shape(array, (k, d), "covariances_init")
            bad = np.flatnonzero((array <= 0).any(axis=1))
        else:
            _check_shape(array, (k, d, d), "covariances_init")
            asymmetric = ~np.isclose(array, array.transpose(0, 2, 1)).all(axis=(1, 2))
            info = torch.linalg.cholesky_ex(torch.from_numpy(array))[1].numpy()
            bad = np.flatnonzero(asymmetric | (info != 0))
        if len(bad):
            raise ValueError(f"expected positive-definite covariances_init, "
                             f"covariances_init[{bad[0]}] is not")
        return torch.from_numpy(array)

    def _log_prob(self, x, params):
        log_gaussian = log_gaussian_full if self.covariance_type == "full" else log_gaussian_diag
        return log_gaussian(x, params["means"], params["covariances"])

    def _m_step(self, x, resp):
        m_step = m_step_full if self.covariance_type == "full" else m_step_diag
        weights, means, covariances = m_step(x, resp, self.reg_covar)
        self._check_fitted_covariances(covariances)
        return {"weights": weights, "means": means, "covariances": covariances}

    def _check_fitted_covariances(self, covariances: torch.Tensor) -> None:
        """Raise ``ValueError``, as scikit-learn does, when an M-step gives a component a
        variance that is not positive (NaN included) or a full covariance that is not positive
        definite: an empty component, or collapsed points without ``reg_covar``."""
        if self.covariance_type == "diag":
            bad = ~(covariances > 0).all(-1)                            # (K,)
        else:
            bad = torch.linalg.cholesky_ex(covariances)[1] != 0         # (K,)
        if bool(bad.any()):
            raise ValueError(f"fitting the mixture failed: component {int(bad.nonzero()[0, 0])} "
                             f"has an ill-defined covariance (for instance collapsed or repeated "
                             f"points); use fewer components or a larger reg_covar "
                             f"(now {self.reg_covar!r})")


class KMeans:
    """k-means by alternating hard assignment and centre update (chapter 02).

    Starts from ``init`` (K, D) or from K distinct data points drawn with ``random_state``;
    stops when no point changes cluster (a fixed point) or after ``max_iter`` iterations.
    Learned: ``cluster_centers_`` (K, D), ``labels_`` (N,), ``inertia_`` (the sum of squared
    distances to the assigned centres), ``converged_``, ``n_iter_`` (number of centre updates),
    ``inertias_`` (the inertia of each assignment, (n_iter_ + 1,)) and ``history_["centres"]``
    (the centres at the start and after each update, (n_iter_ + 1, K, D)).
    """

    def __init__(self, n_clusters: int = 8, *, init=None, max_iter: int = 300,
                 random_state: int | None = None):
        self.n_clusters = n_clusters
        self.init = init
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, X) -> "KMeans":
        """Cluster ``X`` (N, D); return ``self``."""
        k = _check_count(self.n_clusters, "n_clusters")
        _check_count(self.max_iter, "max_iter", minimum=0)
        x = _check_points(X)
        _check_enough_points(x.shape[0], k, "n_clusters")
        if self.init is None:
            rows = np.random.default_rng(self.random_state).choice(x.shape[0], k, replace=False)
            centres = x[torch.from_numpy(rows)]
        else:
            init = _as_array(self.init, "init")
            _check_shape(init, (k, x.shape[1]), "init")
            centres = torch.from_numpy(init)
        labels, sq_dist = kmeans_assign(x, centres)
        history, inertias = [centres], [float(sq_dist.sum())]
        self.converged_ = False
        for _ in range(self.max_iter):
            centres = kmeans_update(x, labels, centres)
            history.append(centres)
            new_labels, sq_dist = kmeans_assign(x, centres)
            inertias.append(float(sq_dist.sum()))
            if torch.equal(new_labels, labels):
                self.converged_ = True
                break
            labels = new_labels
        self.n_features_in_ = x.shape[1]
        self.cluster_centers_ = centres.numpy()
        self.labels_ = labels.numpy()
        self.inertia_ = inertias[-1]
        self.inertias_ = np.array(inertias)
        self.n_iter_ = len(history) - 1
        self.history_ = {"centres": torch.stack(history).numpy()}
        return self

    def predict(self, X) -> np.ndarray:
        """The nearest learned centre of each point: (N,) int64."""
        if not hasattr(self, "cluster_centers_"):
            raise ValueError("this KMeans is not fitted yet; call fit first")
        x = _check_points(X, self.n_features_in_)
        return kmeans_assign(x, torch.from_numpy(self.cluster_centers_))[0].numpy()
