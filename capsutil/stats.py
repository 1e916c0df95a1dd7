"""Accuracy with its uncertainty: every test accuracy the book prints goes through here.

A test set of n images scored k right is a binomial sample; :func:`accuracy_interval` gives the
exact (Clopper-Pearson) 95% interval of the accuracy, from ``scipy.stats.binomtest``.
"""
from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binomtest


def accuracy_interval(correct: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) ``level`` confidence interval of an accuracy ``correct / n``."""
    for name, value in (("correct", correct), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {name}, got {value!r}")
    if not 0 <= correct <= n or n < 1:
        raise ValueError(f"expected 0 <= correct <= n and n >= 1, got correct {correct}, n {n}")
    if not 0 < level < 1:
        raise ValueError(f"expected a confidence level in (0, 1), got {level!r}")
    interval = binomtest(correct, n).proportion_ci(confidence_level=level, method="exact")
    return float(interval.low), float(interval.high)


@dataclass(frozen=True)
class Accuracy:
    """``correct`` right out of ``n``, with its 95% interval; prints as the book reports it,
    e.g. ``99.52% (95% CI 99.37-99.64), 48 errors in 10,000``."""

    correct: int
    n: int

    @property
    def value(self) -> float:
        return self.correct / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return accuracy_interval(self.correct, self.n)

    @property
    def errors(self) -> int:
        return self.n - self.correct

    def __str__(self) -> str:
        low, high = self.interval
        return (f"{self.value:.2%} (95% CI {100 * low:.2f}-{100 * high:.2f}), "
                f"{self.errors:,} errors in {self.n:,}")


@dataclass(frozen=True)
class PairedComparison:
    """Two classifiers scored on the same examples: ``only_a`` examples only A gets right,
    ``only_b`` only B, and the exact McNemar p-value of "A and B are equally accurate" (a
    two-sided binomial test on the examples where they disagree)."""

    only_a: int
    only_b: int
    p_value: float

    def __str__(self) -> str:
        return (f"right only by A: {self.only_a}, only by B: {self.only_b}; "
                f"exact McNemar p = {self.p_value:.3g}")


def paired_comparison(correct_a, correct_b) -> PairedComparison:
    """McNemar's exact test of two classifiers on the same examples, from their per-example
    correctness (two boolean sequences of equal length, e.g. ``predictions == labels``)."""
    a, b = [bool(x) for x in correct_a], [bool(x) for x in correct_b]
    if len(a) != len(b) or not a:
        raise ValueError(f"expected two non-empty sequences of equal length, got {len(a)} and "
                         f"{len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    disagreements = only_a + only_b
    p_value = binomtest(only_a, disagreements).pvalue if disagreements else 1.0
    return PairedComparison(only_a, only_b, float(p_value))
