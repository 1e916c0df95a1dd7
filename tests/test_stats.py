import math

import pytest
from scipy.stats import beta

from capsutil.stats import Accuracy, accuracy_interval, paired_comparison


def test_interval_is_the_clopper_pearson_interval_computed_by_hand():
    # Clopper-Pearson: the bounds are quantiles of beta distributions (Clopper & Pearson 1934).
    k, n = 9952, 10000
    low, high = accuracy_interval(k, n)
    assert low == pytest.approx(beta.ppf(0.025, k, n - k + 1), rel=1e-9)
    assert high == pytest.approx(beta.ppf(0.975, k + 1, n - k), rel=1e-9)


def test_interval_at_the_edges_has_the_closed_form_bound():
    # With no error at all the lower bound is (alpha/2)^(1/n); with no success the upper is 1 - that.
    assert accuracy_interval(20, 20) == pytest.approx((0.025 ** (1 / 20), 1.0))
    assert accuracy_interval(0, 20) == pytest.approx((0.0, 1 - 0.025 ** (1 / 20)))


def test_interval_contains_the_estimate_and_narrows_with_more_data():
    small, large = accuracy_interval(99, 100), accuracy_interval(9900, 10000)
    assert small[0] < 0.99 < small[1] and large[0] < 0.99 < large[1]
    assert large[1] - large[0] < small[1] - small[0]


def test_accuracy_prints_as_the_book_reports_it():
    assert str(Accuracy(9952, 10000)) == "99.52% (95% CI 99.36-99.65), 48 errors in 10,000"
    assert Accuracy(9952, 10000).errors == 48 and math.isclose(Accuracy(1, 4).value, 0.25)


@pytest.mark.parametrize("correct, n, level", [(11, 10, 0.95), (-1, 10, 0.95), (5, 0, 0.95),
                                               (5, 10, 1.0), (5.0, 10, 0.95)])
def test_interval_rejects_impossible_counts(correct, n, level):
    with pytest.raises(ValueError, match="expected"):
        accuracy_interval(correct, n, level)


def test_paired_comparison_is_the_exact_mcnemar_test_computed_by_hand():
    # 10 examples only A gets right, 2 only B, 88 both: p = 2 * P(X <= 2), X ~ Bin(12, 1/2)
    a = [True] * 10 + [False] * 2 + [True] * 88
    b = [False] * 10 + [True] * 2 + [True] * 88
    result = paired_comparison(a, b)
    assert (result.only_a, result.only_b) == (10, 2)
    assert result.p_value == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)
    assert paired_comparison(a, a).p_value == 1.0
    with pytest.raises(ValueError, match="equal length"):
        paired_comparison(a, b[:-1])
