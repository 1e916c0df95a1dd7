import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from capsutil.em import (BinomialMixture, GaussianMixture, KMeans, log_binomial,
                         log_gaussian_diag, log_gaussian_full, log_responsibilities,
                         m_step_binomial, m_step_diag, m_step_full)

HEADS = [5, 9, 8, 4, 7]          # Do & Batzoglou (2008): heads in five experiments of 10 tosses
TOSSES = 10


def hand_em_step(theta_a: float, theta_b: float) -> tuple[float, float]:
    """One EM step for the two coins, written out with the coins picked with probability 1/2."""
    heads_a = tosses_a = heads_b = tosses_b = 0.0
    for h in HEADS:
        like_a = theta_a**h * (1 - theta_a) ** (TOSSES - h)     # C(10, h) and 1/2 cancel
        like_b = theta_b**h * (1 - theta_b) ** (TOSSES - h)
        r_a = like_a / (like_a + like_b)
        heads_a, tosses_a = heads_a + r_a * h, tosses_a + r_a * TOSSES
        heads_b, tosses_b = heads_b + (1 - r_a) * h, tosses_b + (1 - r_a) * TOSSES
    return heads_a / tosses_a, heads_b / tosses_b


def hand_log_likelihood(theta_a: float, theta_b: float) -> float:
    """sum_n log(1/2 Bin(h_n; 10, theta_A) + 1/2 Bin(h_n; 10, theta_B))."""
    return sum(math.log(0.5 * math.comb(TOSSES, h) * (theta_a**h * (1 - theta_a) ** (TOSSES - h)
                                                      + theta_b**h * (1 - theta_b) ** (TOSSES - h)))
               for h in HEADS)


def classic_coins(**settings) -> BinomialMixture:
    return BinomialMixture(2, n_trials=TOSSES, thetas_init=[0.6, 0.5], fix_weights=True,
                           **settings).fit(HEADS)


def test_coin_em_first_iteration_matches_the_hand_computation():
    # Responsibilities of coin A: 0.45, 0.80, 0.73, 0.35, 0.65, so thetaA = 21.3 / 29.9 = 0.71
    # and thetaB = 11.7 / 20.1 = 0.58 (Do & Batzoglou 2008, figure 1b).
    coins = classic_coins(max_iter=1)
    np.testing.assert_allclose(coins.history_["thetas"][1], hand_em_step(0.6, 0.5), rtol=1e-12)
    np.testing.assert_allclose(coins.history_["thetas"][1], [0.71, 0.58], atol=0.005)
    at_start = classic_coins(max_iter=0).predict_proba(HEADS)[:, 0]
    np.testing.assert_allclose(at_start, [0.45, 0.80, 0.73, 0.35, 0.65], atol=0.005)


def test_coin_em_converges_to_the_hand_iterated_fixed_point():
    coins = classic_coins(tol=1e-10, max_iter=500)
    theta = (0.6, 0.5)
    for _ in range(coins.n_iter_):
        theta = hand_em_step(*theta)
    assert coins.converged_
    np.testing.assert_allclose(coins.thetas_, theta, rtol=1e-9)
    np.testing.assert_allclose(hand_em_step(*theta), theta, atol=1e-6)      # a fixed point
    np.testing.assert_allclose(coins.thetas_, [0.80, 0.52], atol=0.005)
    np.testing.assert_array_equal(coins.weights_, [0.5, 0.5])               # kept fixed


def test_coin_em_path_reaches_080_052_in_about_ten_iterations():
    path = classic_coins(max_iter=10).history_["thetas"]
    assert path.shape == (11, 2)
    np.testing.assert_allclose(path[10], [0.80, 0.52], atol=0.005)


def test_coin_log_likelihoods_are_the_marginal_ones_and_never_decrease():
    coins = classic_coins(tol=1e-10, max_iter=500)
    expected = [hand_log_likelihood(*theta) for theta in coins.history_["thetas"]]
    np.testing.assert_allclose(coins.log_likelihoods_, expected, rtol=1e-12)
    for start in ([0.6, 0.5], [0.1, 0.95], [0.45, 0.5], [0.99, 0.01]):
        lls = BinomialMixture(2, n_trials=TOSSES, thetas_init=start, fix_weights=True,
                              max_iter=50, tol=0).fit(HEADS).log_likelihoods_
        assert np.all(np.diff(lls) >= -1e-12)


def test_equal_starting_thetas_stay_on_the_symmetric_saddle():
    coins = BinomialMixture(2, n_trials=TOSSES, thetas_init=[0.5, 0.5], fix_weights=True).fit(HEADS)
    np.testing.assert_allclose(coins.thetas_, [33 / 50, 33 / 50], rtol=1e-12)   # pooled heads


def test_swapped_start_gives_swapped_coins():
    coins = classic_coins(tol=1e-10, max_iter=500)
    swapped = BinomialMixture(2, n_trials=TOSSES, thetas_init=[0.5, 0.6], fix_weights=True,
                              tol=1e-10, max_iter=500).fit(HEADS)
    np.testing.assert_allclose(swapped.thetas_, coins.thetas_[::-1], rtol=1e-9)


def two_gaussians(n: int = 1000, seed: int = 0) -> np.ndarray:
    """Chapter 02's data: weights .6 / .4, means (0, 4) and (-2, 0), diag(3, .5) and diag(1, 2)."""
    rng = np.random.default_rng(seed)
    n_first = int(0.6 * n)
    return np.concatenate([rng.multivariate_normal([0, 4], np.diag([3, 0.5]), n_first),
                           rng.multivariate_normal([-2, 0], np.diag([1, 2]), n - n_first)])


START = {"weights_init": np.array([0.3, 0.7]), "means_init": np.array([[1.0, 1.0], [-1.0, 2.0]])}
START_COVARIANCES = {"full": np.array([[[1.0, 0.3], [0.3, 1.0]], [[2.0, 0.0], [0.0, 1.0]]]),
                     "diag": np.array([[1.0, 1.0], [2.0, 1.0]])}


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("tol, max_iter", [(1e-3, 100), (0.0, 5)])
def test_gmm_matches_sklearn_from_the_same_start(covariance_type, tol, max_iter):
    x = two_gaussians()
    covariances = START_COVARIANCES[covariance_type]
    precisions = np.linalg.inv(covariances) if covariance_type == "full" else 1 / covariances
    ours = GaussianMixture(2, covariance_type=covariance_type, tol=tol, max_iter=max_iter,
                           covariances_init=covariances, **START).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = SklearnGaussianMixture(2, covariance_type=covariance_type, tol=tol,
                                           max_iter=max_iter, precisions_init=precisions,
                                           reg_covar=1e-6, **START).fit(x)
    assert (ours.n_iter_, ours.converged_) == (reference.n_iter_, reference.converged_)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(reference, name), rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    # sklearn's lower_bound_ is the mean log-likelihood measured by its last E-step, that is at
    # the parameters before the last M-step: our second-to-last entry.
    assert ours.log_likelihoods_[-2] / len(x) == pytest.approx(reference.lower_bound_, rel=1e-12)
    assert ours.score(x) == pytest.approx(reference.score(x), rel=1e-12)
    np.testing.assert_allclose(ours.predict_proba(x), reference.predict_proba(x), atol=1e-10)


def test_gmm_log_likelihood_never_decreases_and_history_has_every_iteration():
    gmm = GaussianMixture(2, tol=0.0, max_iter=30, random_state=0).fit(two_gaussians())
    assert np.all(np.diff(gmm.log_likelihoods_) >= -1e-9)
    assert gmm.history_["means"].shape == (31, 2, 2)
    assert gmm.history_["covariances"].shape == (31, 2, 2, 2)
    np.testing.assert_array_equal(gmm.history_["means"][-1], gmm.means_)


def test_gmm_recovers_the_generating_mixture():
    gmm = GaussianMixture(2, covariance_type="diag", random_state=0).fit(two_gaussians(5000))
    first = np.argmax(gmm.weights_)
    np.testing.assert_allclose(gmm.weights_[[first, 1 - first]], [0.6, 0.4], atol=0.03)
    np.testing.assert_allclose(gmm.means_[[first, 1 - first]], [[0, 4], [-2, 0]], atol=0.1)
    np.testing.assert_allclose(gmm.covariances_[[first, 1 - first]], [[3, 0.5], [1, 2]], atol=0.2)


def test_gaussian_log_densities_equal_scipys():
    rng = np.random.default_rng(1)
    x, means = rng.normal(size=(20, 3)), rng.normal(size=(2, 3))
    factors = rng.normal(size=(2, 3, 3))
    covariances = factors @ factors.transpose(0, 2, 1) + np.eye(3)
    expected = np.stack([multivariate_normal(m, c).logpdf(x)
                         for m, c in zip(means, covariances)], axis=1)
    got = log_gaussian_full(*map(torch.from_numpy, (x, means, covariances)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    variances = np.diagonal(covariances, axis1=1, axis2=2)
    expected = np.stack([multivariate_normal(m, np.diag(v)).logpdf(x)
                         for m, v in zip(means, variances)], axis=1)
    got = log_gaussian_diag(*map(torch.from_numpy, (x, means, variances.copy())))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_log_domain_e_step_survives_points_far_from_every_component():
    f64 = dict(dtype=torch.float64)
    x = torch.tensor([[0.0], [1e3], [-1e3]], **f64)                    # exp(log p) underflows to 0
    log_prob = log_gaussian_diag(x, torch.tensor([[-1.0], [1.0]], **f64), torch.ones(2, 1, **f64))
    assert torch.exp(log_prob[1:]).eq(0).all()
    log_resp, log_evidence = log_responsibilities(log_prob, torch.log(torch.tensor([0.5, 0.5], **f64)))
    torch.testing.assert_close(log_resp.exp().sum(-1), torch.ones(3, **f64))
    torch.testing.assert_close(log_resp.exp()[1:], torch.tensor([[0.0, 1.0], [1.0, 0.0]], **f64))
    assert torch.isfinite(log_evidence).all()


def test_diagonal_steps_broadcast_over_leading_batch_dimensions():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 4, dtype=torch.float64)
    means = torch.randn(3, 2, 4, dtype=torch.float64)
    variances = torch.rand(3, 2, 4, dtype=torch.float64) + 0.1
    resp = torch.softmax(torch.randn(3, 40, 2, dtype=torch.float64), -1)
    batched = log_gaussian_diag(x, means, variances)
    steps = m_step_diag(x, resp)
    for b in range(3):
        torch.testing.assert_close(batched[b], log_gaussian_diag(x[b], means[b], variances[b]))
        for got, expected in zip(steps, m_step_diag(x[b], resp[b])):
            torch.testing.assert_close(got[b], expected)


def test_fix_weights_keeps_the_starting_weights():
    gmm = GaussianMixture(2, weights_init=[0.5, 0.5], fix_weights=True, random_state=0)
    assert gmm.fit(two_gaussians()) is gmm
    np.testing.assert_array_equal(gmm.history_["weights"], np.full((gmm.n_iter_ + 1, 2), 0.5))


def test_kmeans_hand_checked_example():
    # 1-D points on the x-axis, centres start at 0 and 1:
    # assign {0} {1,4,9,10} -> centres 0, 6; assign {0,1} {4,9,10} -> 0.5, 23/3;
    # assign {0,1,4} {9,10} -> 5/3, 9.5; assignment unchanged: converged after 3 updates.
    x = [[0, 0], [1, 0], [9, 0], [10, 0], [4, 0]]
    km = KMeans(2, init=[[0, 0], [1, 0]]).fit(x)
    assert km.converged_ and km.n_iter_ == 3
    np.testing.assert_allclose(km.history_["centres"][:, :, 0], [[0, 1], [0, 6], [0.5, 23 / 3],
                                                                  [5 / 3, 9.5]])
    np.testing.assert_array_equal(km.labels_, [0, 0, 1, 1, 0])
    np.testing.assert_allclose(km.inertias_, [154, 30, 12.75 + 65 / 9, 78 / 9 + 0.5])
    np.testing.assert_array_equal(km.predict([[2, 0], [8, 0]]), [0, 1])


BAD_GMM_INPUTS = [
    (np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), {}, "data contains NaN or infinite values"),
    (np.array([[0.0, 1.0], [np.inf, 2.0], [1.0, 1.0]]), {}, "data contains NaN or infinite values"),
    (np.zeros((2, 2)), {"n_components": 3}, "at least n_components=3 points, got 2"),
    (np.zeros(10), {}, r"shape \(n_points, n_features\), got shape \(10,\)"),
    (np.zeros((4, 2, 1)), {}, r"shape \(n_points, n_features\), got shape \(4, 2, 1\)"),
    (np.eye(3), {"means_init": np.zeros((2, 2))}, r"means_init of shape \(2, 3\), got \(2, 2\)"),
    (np.eye(3), {"covariances_init": np.stack([np.eye(3), -np.eye(3)])},
     r"positive-definite covariances_init, covariances_init\[1\] is not"),
    (np.eye(3), {"covariances_init": np.stack([np.eye(3), np.eye(3)])[:, :2]},
     r"covariances_init of shape \(2, 3, 3\), got \(2, 2, 3\)"),
    (np.eye(3), {"covariance_type": "diag", "covariances_init": [[1, 1, 1], [1, 0, 1]]},
     r"covariances_init\[1\] is not"),
    (np.eye(3), {"covariance_type": "spherical"}, "covariance_type in"),
    (np.eye(3), {"weights_init": [0.5, 0.6]}, "non-negative and sum to 1"),
]


@pytest.mark.parametrize("data, settings, message", BAD_GMM_INPUTS)
def test_gmm_rejects_bad_input(data, settings, message):
    settings = {"n_components": 2, **settings}
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**settings).fit(data)


def test_predict_needs_the_features_seen_in_fit():
    gmm = GaussianMixture(2, random_state=0).fit(two_gaussians())
    with pytest.raises(ValueError, match="expected data with 2 features \\(as in fit\\), got 3"):
        gmm.predict_proba(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="not fitted yet"):
        GaussianMixture(2).score(np.zeros((5, 2)))


@pytest.mark.parametrize("heads, settings, message", [
    ([5, 11, 3], {}, "whole numbers of heads between 0 and n_trials=10"),
    ([5, 2.5, 3], {}, "whole numbers of heads between 0 and n_trials=10"),
    ([5, np.nan, 3], {}, "heads contains NaN or infinite values"),
    ([[5, 4]], {}, r"heads of shape \(n_experiments,\), got shape \(1, 2\)"),
    ([5], {}, "at least n_components=2 points, got 1"),
    ([5, 4], {"thetas_init": [0.6, 1.0]}, "thetas_init strictly between 0 and 1"),
    ([5, 4], {"n_trials": 0}, "n_trials to be an integer >= 1, got 0"),
])
def test_coin_mixture_rejects_bad_input(heads, settings, message):
    settings = {"n_trials": TOSSES, **settings}
    with pytest.raises(ValueError, match=message):
        BinomialMixture(2, **settings).fit(heads)


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="data contains NaN or infinite values"):
        KMeans(2).fit([[0.0, np.nan], [1.0, 1.0], [2.0, 2.0]])
    with pytest.raises(ValueError, match="at least n_clusters=3 points, got 2"):
        KMeans(3).fit([[0.0, 0.0], [1.0, 1.0]])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_gmm_on_constant_data_without_reg_covar_raises_like_sklearn(covariance_type):
    """Two components on one repeated point: one component gets no data and a zero (diagonal)
    or singular (full) covariance, which used to give NaN silently."""
    constant = np.full((20, 2), 3.0)
    with pytest.raises(ValueError, match="component [01] has an ill-defined covariance .* larger "
                                         "reg_covar \\(now 0\\)"):
        GaussianMixture(2, covariance_type=covariance_type, reg_covar=0,
                        random_state=0).fit(constant)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        SklearnGaussianMixture(2, covariance_type=covariance_type, reg_covar=0,
                               random_state=0).fit(constant)


@pytest.mark.parametrize("variances", [torch.zeros(2, 3), -torch.ones(2, 3),
                                       torch.full((2, 3), float("nan"))])
def test_diagonal_log_density_refuses_variances_that_are_not_positive(variances):
    with pytest.raises(ValueError, match="expected positive variances"):
        log_gaussian_diag(torch.randn(4, 3), torch.zeros(2, 3), variances)


@pytest.mark.parametrize("thetas", [torch.tensor([0.5, 1.5]), torch.tensor([-0.1, 0.5]),
                                    torch.tensor([0.5, float("nan")])])
def test_binomial_log_probability_refuses_thetas_outside_0_1(thetas):
    with pytest.raises(ValueError, match="expected thetas in \\[0, 1\\]"):
        log_binomial(torch.tensor([3.0, 7.0]), 10, thetas.double())


@pytest.mark.parametrize("m_step", [m_step_diag, m_step_full])
def test_m_steps_refuse_responsibilities_outside_0_1(m_step):
    resp = torch.tensor([[0.5, 0.5], [1.2, -0.2], [0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="expected responsibilities resp in \\[0, 1\\], got "
                                         "values from -0.2 to 1.2"):
        m_step(torch.randn(3, 2, dtype=torch.float64), resp)
    with pytest.raises(ValueError, match="expected responsibilities resp in \\[0, 1\\]"):
        m_step_binomial(torch.tensor([3.0, 7.0, 5.0]), 10, resp)


def test_full_covariance_m_step_builds_its_identity_on_the_data_device():
    x = torch.empty(5, 3, dtype=torch.float64, device="meta")
    resp = torch.empty(5, 2, dtype=torch.float64, device="meta")
    weights, means, covariances = m_step_full(x, resp)
    assert covariances.device.type == "meta" and covariances.shape == (2, 3, 3)
