"""Exact statistical tools behind the robustness certificates.

Everything here is plain numpy/scipy: binomial confidence bounds and tests, Holm's
multiple-testing correction, zero-failure sample sizes, McNemar's exact test and Wald's SPRT.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import stats as _st

__all__ = [
    "SPRT",
    "HolmResult",
    "binom_test_pvalue",
    "clopper_pearson",
    "holm",
    "mcnemar_exact",
    "validate_confidence",
    "zero_failure_sample_size",
]

_SIDES = ("two-sided", "lower", "upper")
_ALTERNATIVES = ("two-sided", "greater", "less")


# --------------------------------------------------------------------------- validation


def validate_confidence(confidence: float, name: str = "confidence") -> None:
    """Raise ValueError unless 0 < confidence < 1 (NaN is rejected)."""
    if not isinstance(confidence, numbers.Real) or not 0.0 < confidence < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {confidence!r}")


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return value as int; ValueError unless it is an integer (not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_kn(k: object, n: object) -> tuple[int, int]:
    """Validate binomial counts: integers with n >= 1 and 0 <= k <= n."""
    n = _check_int("n", n, 1)
    k = _check_int("k", k, 0)
    if k > n:
        raise ValueError(f"k must satisfy 0 <= k <= n, got k={k}, n={n}")
    return k, n


def _check_unit_interval(name: str, value: object, *, closed: bool) -> float:
    """Validate a probability: in [0, 1] if closed else in (0, 1)."""
    ok = isinstance(value, numbers.Real) and (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0)
    if not ok:
        rng = "[0, 1]" if closed else "the open interval (0, 1)"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- binomial


def clopper_pearson(
    k: int, n: int, confidence: float = 0.95, side: str = "two-sided"
) -> tuple[float, float]:
    """Exact Clopper-Pearson interval for a binomial proportion from k successes in n trials.

    With probability at least ``confidence`` over the n i.i.d. Bernoulli(p) trials, the
    returned interval contains the true p (for every p; the interval is conservative).

    side="two-sided": alpha/2 in each tail (alpha = 1 - confidence);
    side="lower": one-sided lower bound at level alpha, upper end is 1.0;
    side="upper": one-sided upper bound at level alpha, lower end is 0.0.
    Uses scipy.stats.beta.ppf; k=0 gives lower 0, k=n gives upper 1.
    """
    k, n = _check_kn(k, n)
    validate_confidence(confidence)
    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    alpha = 1.0 - confidence
    tail = alpha / 2 if side == "two-sided" else alpha
    lo, hi = 0.0, 1.0
    if side != "upper" and k > 0:
        lo = float(_st.beta.ppf(tail, k, n - k + 1))
    if side != "lower" and k < n:
        hi = float(_st.beta.ppf(1.0 - tail, k + 1, n - k))
    return lo, hi


def binom_test_pvalue(k: int, n: int, p0: float, alternative: str) -> float:
    """Exact binomial test p-value for k successes in n trials against success rate p0.

    alternative="greater": H1 p > p0, p-value = P(X >= k | n, p0);
    "less": H1 p < p0, p-value = P(X <= k | n, p0);
    "two-sided": scipy.stats.binomtest's two-sided p-value.
    Under H0 (p = p0, or p on the H0 side for one-sided tests) P(p-value <= a) <= a for all a.
    """
    k, n = _check_kn(k, n)
    p0 = _check_unit_interval("p0", p0, closed=True)
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative must be one of {_ALTERNATIVES}, got {alternative!r}")
    if alternative == "greater":
        p = _st.binom.sf(k - 1, n, p0)
    elif alternative == "less":
        p = _st.binom.cdf(k, n, p0)
    else:
        p = _st.binomtest(k, n, p0, alternative="two-sided").pvalue
    return float(min(1.0, max(0.0, p)))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts of a paired comparison.

    b = pairs where A is right and B wrong, c = pairs where A is wrong and B right.
    Binomial test of b against Binomial(b+c, 1/2): p = min(1, 2 * P(X <= min(b, c))).
    If A and B have equal error rates, P(p-value <= a) <= a. b + c == 0 gives 1.0.
    """
    b = _check_int("b", b, 0)
    c = _check_int("c", c, 0)
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2.0 * _st.binom.cdf(min(b, c), b + c, 0.5)))


# --------------------------------------------------------------------------- Holm


@dataclass(frozen=True)
class HolmResult:
    """Outcome of Holm's step-down procedure; every field is in the input order.

    adjusted: Holm-adjusted p-values.
    rejected: adjusted <= alpha.
    levels: the level alpha / (m - rank + 1) the step-down procedure compares each p with.
    """

    adjusted: tuple[float, ...]
    rejected: tuple[bool, ...]
    levels: tuple[float, ...]


def holm(pvalues: Sequence[float], alpha: float) -> HolmResult:
    """Holm's step-down multiple-testing correction.

    Rejecting the hypotheses with ``rejected`` True keeps the family-wise error rate (the
    probability of rejecting at least one true null) <= alpha under any dependence between
    the p-values, provided each true-null p-value is valid (P(p <= a) <= a).

    With p_(1) <= ... <= p_(m) (stable sort, ties keep input order) the adjusted p-value of
    the hypothesis of rank i is max_{j <= i} min(1, (m - j + 1) p_(j)). m = 0 gives empty tuples.
    """
    validate_confidence(alpha, name="alpha")
    alpha = float(alpha)
    ps = []
    for i, p in enumerate(pvalues):
        ps.append(_check_unit_interval(f"pvalues[{i}]", p, closed=True))
    m = len(ps)
    if m == 0:
        return HolmResult((), (), ())
    p = np.asarray(ps, dtype=float)
    order = np.argsort(p, kind="stable")
    factors = m - np.arange(m)  # m, m-1, ..., 1 for ranks 1..m
    adj_sorted = np.maximum.accumulate(np.minimum(1.0, factors * p[order]))
    adjusted = np.empty(m)
    adjusted[order] = adj_sorted
    levels = np.empty(m)
    levels[order] = alpha / factors
    return HolmResult(
        adjusted=tuple(float(a) for a in adjusted),
        rejected=tuple(bool(a <= alpha) for a in adjusted),
        levels=tuple(float(v) for v in levels),
    )


# --------------------------------------------------------------------------- sample size


def _zero_failures_demonstrate(n: int, p_max: float, confidence: float) -> bool:
    """Exactly decide (1 - p_max)^n <= 1 - confidence for the given float inputs.

    A log-space comparison settles clear cases; near-ties fall back to rational arithmetic.
    """
    lhs = n * math.log1p(-p_max)
    rhs = math.log1p(-confidence)
    tol = 1e-12 * max(1.0, abs(lhs), abs(rhs))
    if lhs < rhs - tol:
        return True
    if lhs > rhs + tol:
        return False
    return (1 - Fraction(p_max)) ** n <= 1 - Fraction(confidence)


def zero_failure_sample_size(p_max: float, confidence: float = 0.95) -> int:
    """Smallest n such that 0 failures in n i.i.d. trials demonstrates p_fail <= p_max.

    That is, the smallest n with (1 - p_max)^n <= 1 - confidence: if p_fail > p_max, the
    probability of seeing no failure in n trials is < 1 - confidence, so "0 failures in n"
    certifies p_fail <= p_max with confidence ``confidence`` (one-sided Clopper-Pearson with
    k = 0). E.g. (1e-2, .95) -> 299, (1e-3, .95) -> 2995, (1e-4, .95) -> 29956.
    The log1p estimate is corrected by an exact check, so there is no off-by-one.
    """
    p_max = _check_unit_interval("p_max", p_max, closed=False)
    validate_confidence(confidence)
    n = max(1, math.ceil(math.log1p(-confidence) / math.log1p(-p_max)))
    while n > 1 and _zero_failures_demonstrate(n - 1, p_max, confidence):
        n -= 1
    while not _zero_failures_demonstrate(n, p_max, confidence):
        n += 1
    return n


# --------------------------------------------------------------------------- SPRT


class SPRT:
    """Wald's sequential probability ratio test for a Bernoulli failure rate p.

    H0: p >= p0 (not robust) vs H1: p <= p1 (robust), with 0 < p1 < p0 < 1.
    llr = sum over draws of log(P1(x)/P0(x)): a failure adds ln(p1/p0), a success adds
    ln((1-p1)/(1-p0)). Decide H1 when llr >= log A = ln((1-beta)/alpha), H0 when
    llr <= log B = ln(beta/(1-alpha)), else continue.

    Guarantee (Wald), when sampling stops at the first decision other than "continue":
    P(decide H1) <= alpha / (1 - beta) for any p >= p0 and P(decide H0) <= beta / (1 - alpha)
    for any p <= p1 (alpha and beta themselves are Wald's usual approximations).
    E.g. alpha=beta=0.05, p0=0.01, p1=0.001, no failures: decides H1 after exactly 326 draws.
    """

    def __init__(self, p0: float, p1: float, alpha: float = 0.05, beta: float = 0.05):
        self.p0 = _check_unit_interval("p0", p0, closed=False)
        self.p1 = _check_unit_interval("p1", p1, closed=False)
        if not self.p1 < self.p0:
            raise ValueError(f"p1 must be < p0 (0 < p1 < p0 < 1), got p1={p1!r}, p0={p0!r}")
        self.alpha = _check_unit_interval("alpha", alpha, closed=False)
        self.beta = _check_unit_interval("beta", beta, closed=False)
        if not self.alpha + self.beta < 1.0:
            raise ValueError(f"alpha + beta must be < 1, got alpha={alpha!r}, beta={beta!r}")
        self.log_a = math.log((1.0 - self.beta) / self.alpha)
        self.log_b = math.log(self.beta / (1.0 - self.alpha))
        self.failure_step = math.log(self.p1 / self.p0)  # < 0
        self.success_step = math.log1p(-self.p1) - math.log1p(-self.p0)  # > 0

    def __repr__(self) -> str:
        return f"SPRT(p0={self.p0!r}, p1={self.p1!r}, alpha={self.alpha!r}, beta={self.beta!r})"

    def llr(self, failures: int, draws: int) -> float:
        """Log-likelihood ratio log(P1/P0) of `failures` failures among `draws` draws."""
        return failures * self.failure_step + (draws - failures) * self.success_step

    def decide(self, failures: int, draws: int) -> str:
        """Decision for the cumulative counts: "H1" (robust), "H0" (not robust) or "continue"."""
        draws = _check_int("draws", draws, 0)
        failures = _check_int("failures", failures, 0)
        if failures > draws:
            raise ValueError(f"failures must be <= draws, got failures={failures}, draws={draws}")
        llr = self.llr(failures, draws)
        if llr >= self.log_a:
            return "H1"
        if llr <= self.log_b:
            return "H0"
        return "continue"

    def decide_many(self, failures: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """Vectorised decide over broadcast arrays: int8 array, 1 = H1, -1 = H0, 0 = continue."""
        f = np.asarray(failures)
        d = np.asarray(draws)
        for name, a in (("failures", f), ("draws", d)):
            if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
                raise ValueError(f"{name} must be a numeric array, got dtype {a.dtype}")
            if not np.all(np.isfinite(a) & (a == np.round(a)) & (a >= 0)):
                raise ValueError(f"{name} must hold non-negative integers")
        if np.any(f > d):
            raise ValueError("failures must be <= draws elementwise")
        f = f.astype(np.float64)
        llr = f * self.failure_step + (d - f) * self.success_step
        out = np.zeros(np.broadcast(f, d).shape, dtype=np.int8)
        out[llr >= self.log_a] = 1
        out[llr <= self.log_b] = -1
        return out

    def draws_to_accept_h1_without_failures(self) -> int:
        """Smallest n with n * ln((1-p1)/(1-p0)) >= log A, i.e. decide(0, n) == "H1"."""
        n = max(1, math.ceil(self.log_a / self.success_step))
        while n > 1 and self.llr(0, n - 1) >= self.log_a:
            n -= 1
        while self.llr(0, n) < self.log_a:
            n += 1
        return n
