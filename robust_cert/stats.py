"""Exact statistical tools behind the robustness certificates.

Everything here is plain numpy/scipy: binomial confidence bounds and tests, betting
confidence bounds for the mean of bounded variables (clustered draws), Holm's multiple-testing
correction, zero-failure sample sizes, McNemar's exact test, Tango's score interval for a paired
difference of proportions and Wald's SPRT.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import numpy as np
from scipy import special as _sp


def _scipy_stats():
    """``scipy.stats``, imported on first use: it takes about a second to import, and the
    Clopper-Pearson bounds and normal quantiles that every certificate and report needs come
    from ``scipy.special`` (``betaincinv``, ``ndtri``: the same functions, bit for bit, that
    ``scipy.stats.beta.ppf`` and ``norm.ppf`` evaluate), as do the one-sided binomial tails
    (:func:`_binom_sf`, :func:`_binom_cdf`)."""
    from scipy import stats

    return stats


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X > k) for X ~ Binomial(n, p), 0 ≤ p ≤ 1: what ``scipy.stats.binom.sf`` returns, bit
    for bit — it is the Boost ufunc ``scipy.special._ufuncs._binom_sf`` that binom.sf calls
    inside its support (1 below it, 0 from n on), without importing scipy.stats. A SciPy
    without that ufunc gets binom.sf itself."""
    ufunc = getattr(getattr(_sp, "_ufuncs", None), "_binom_sf", None)
    if ufunc is None:
        return float(_scipy_stats().binom.sf(k, n, p))
    if k < 0:
        return 1.0
    if k >= n:
        return 0.0
    return float(ufunc(k, n, p))


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), 0 ≤ p ≤ 1: what ``scipy.stats.binom.cdf`` returns, bit
    for bit (the Boost ufunc ``scipy.special._ufuncs._binom_cdf`` it calls inside its support;
    0 below it, 1 from n on), without importing scipy.stats."""
    ufunc = getattr(getattr(_sp, "_ufuncs", None), "_binom_cdf", None)
    if ufunc is None:
        return float(_scipy_stats().binom.cdf(k, n, p))
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(ufunc(k, n, p))

__all__ = [
    "SPRT",
    "BettingBound",
    "HolmResult",
    "betting_interval",
    "binom_test_pvalue",
    "clopper_pearson",
    "holm",
    "mcnemar_exact",
    "tango_interval",
    "tango_score",
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
    # (typeshed's numbers.Real has no comparisons; every Real here compares with a float)
    ok = isinstance(value, numbers.Real) and (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0)  # pyright: ignore[reportOperatorIssue]
    if not ok:
        rng = "[0, 1]" if closed else "the open interval (0, 1)"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(cast(numbers.Real, value))  # ok: a Real


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
    Uses the beta quantile (scipy.special.betaincinv); k=0 gives lower 0, k=n gives upper 1.
    """
    k, n = _check_kn(k, n)
    validate_confidence(confidence)
    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    alpha = 1.0 - confidence
    tail = alpha / 2 if side == "two-sided" else alpha
    lo, hi = 0.0, 1.0
    if side != "upper" and k > 0:
        lo = float(_sp.betaincinv(k, n - k + 1, tail))  # = scipy.stats.beta.ppf
    if side != "lower" and k < n:
        hi = float(_sp.betaincinv(k + 1, n - k, 1.0 - tail))
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
        p = _binom_sf(k - 1, n, p0)
    elif alternative == "less":
        p = _binom_cdf(k, n, p0)
    else:
        p = _scipy_stats().binomtest(k, n, p0, alternative="two-sided").pvalue
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
    return float(min(1.0, 2.0 * _binom_cdf(min(b, c), b + c, 0.5)))


# --------------------------------------------------------------------------- betting

#: Largest bet the betting bounds place (a fraction of the capital per observation); < 1 keeps
#: every capital factor 1 + λ(m − x) ≥ 1 − c > 0, so the capital is monotone in m.
BET_CAP = 0.9
#: Number of seeded orders whose capitals :class:`BettingBound` averages (at most; fewer when
#: orders × n would exceed BET_MAX_CELLS, so memory stays bounded for very many points).
BET_ORDERS = 32
BET_MAX_CELLS = 4_000_000


def _unit_values(x: object, name: str = "x") -> np.ndarray:
    """Validate a non-empty 1-D array of finite values in [0, 1]; return it as float64."""
    a = np.asarray(x, dtype=float)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a) & (a >= 0.0) & (a <= 1.0)):
        raise ValueError(f"{name} must hold values in [0, 1]")
    return a


def _boundary(gap: Callable[[float], float], out: float, inside: float) -> float:
    """The float of [0, 1] nearest ``out`` where the monotone ``gap`` is still ≥ 0: bisection
    between ``out`` (gap < 0) and ``inside`` (gap ≥ 0) until the two are adjacent floats (about
    56 halvings for a bound near 0.07). What is returned always has gap ≥ 0, so it lies on the
    outer side of the exact root — a bound rounded outward by less than one float spacing,
    never inward. Pure Python on floats: no root finder to import (scipy.optimize costs about
    a second), and the same float on every machine."""
    while True:
        mid = 0.5 * (out + inside)
        if mid in (out, inside):
            return float(inside)
        if gap(mid) >= 0:
            inside = mid
        else:
            out = mid


class BettingBound:
    """Betting confidence bounds and e-values for the mean of bounded independent variables.

    Setting: ``x`` = X_1, ..., X_n are independent, take values in [0, 1] and share one mean
    μ = E X_i (they need not be identically distributed). This is the situation of clustered
    draws: X_i is the observed failure rate of evaluation point i (f_i failures in m_i ≥ 1 noise
    draws, the m_i fixed or drawn independently of the points), the points are an i.i.d. sample
    of the population, and μ is the population failure rate E_x[p_fail(x)]. Nothing is assumed
    about the distribution of the per-point rates or about the number of draws per point.

    Method: Waudby-Smith & Ramdas (2023, "Estimating means of bounded random variables by
    betting", JRSS-B), hedged-capital construction, one side at a time. For a candidate mean m
    and a fixed order π of the observations, the capital of a gambler betting that the mean is
    below m is K^π(m) = ∏_t (1 + λ_t (m − X_π(t))) ("upper" side; the "lower" side, betting
    that the mean is above m, uses X_π(t) − m instead). The bets are the predictable plug-in
    λ_t = min(BET_CAP, sqrt(2 ln(1/tune_alpha) / (n σ̂²_{t−1}))) with
    σ̂²_{t−1} = (1/4 + Σ_{i<t} (X_π(i) − μ̂_i)²) / t and μ̂_i = (1/2 + Σ_{j≤i} X_π(j)) / (i + 1):
    λ_t uses only the observations before t and does not depend on m. The e-value is the
    average E(m) of K^π(m) over ``orders`` permutations π (default BET_ORDERS, fewer when
    orders × n would exceed BET_MAX_CELLS) drawn from a generator seeded with ``seed`` (fixed
    before, and independently of, the data values; averaging removes most of the dependence
    on the order).

    Guarantee (exact, finite-sample, no approximation): if μ ≥ m then E[E_upper(m)] ≤ 1, and if
    μ ≤ m then E[E_lower(m)] ≤ 1 (each capital is a non-negative supermartingale started at 1;
    an average of e-values is an e-value). By Markov's inequality:

    * ``p_value(m0, "less")`` = min(1, 1/E_upper(m0)) is a valid p-value for H0: μ ≥ m0, i.e.
      P(p ≤ a) ≤ a for every a and every μ ≥ m0 ("greater": H0 μ ≤ m0, with E_lower);
    * ``bound(a, "upper")`` = inf{m : E_upper(m) ≥ 1/a} satisfies P(μ > bound) ≤ a, and
      ``bound(a, "lower")`` = sup{m : E_lower(m) ≥ 1/a} satisfies P(μ < bound) ≤ a.

    Both e-values are continuous and monotone in m (every factor is positive because
    λ_t ≤ BET_CAP < 1), so the bound is the root of log E(m) = ln(1/a), found by Brent's
    method and rounded outward (E ≥ 1/a at the returned value, so the upper bound is never
    below the exact one), and the test and the bound agree: p_value(m0, "less") ≤ a exactly
    when bound(a, "upper") ≤ m0 (up to the root tolerance, about 1e-13). The bets are tuned
    for ``tune_alpha`` only; bounds at any other level a are equally valid, merely less tight.
    The bound is conservative: with all X_i = 0 the upper bound is about ln(1/a)/(BET_CAP·n),
    so it needs as many *points* as Clopper–Pearson needs independent trials, however many
    draws each point gets.

    Example::

        BettingBound(rates, tune_alpha=0.05).bound(0.05, "upper")  # 95% upper bound on μ
    """

    def __init__(self, x: Sequence[float] | np.ndarray, tune_alpha: float = 0.05, *,
                 orders: int | None = None, seed: int = 0):
        self.x = _unit_values(x)
        validate_confidence(tune_alpha, name="tune_alpha")
        self.n = int(self.x.size)
        if orders is None:  # depends on n only, never on the values
            orders = max(1, min(BET_ORDERS, BET_MAX_CELLS // self.n))
        orders = _check_int("orders", orders, 1)
        self.tune_alpha = float(tune_alpha)
        rng = np.random.default_rng(_check_int("seed", seed, 0))
        perms = np.stack([rng.permutation(self.n) for _ in range(orders)])
        xs = self.x[perms]  # (orders, n)
        t = np.arange(1, self.n + 1, dtype=float)
        mu = (0.5 + np.cumsum(xs, axis=1)) / (t + 1)
        var = (0.25 + np.cumsum((xs - mu) ** 2, axis=1)) / (t + 1)
        var_prev = np.concatenate([np.full((orders, 1), 0.25), var[:, :-1]], axis=1)
        lam = np.sqrt(2.0 * math.log(1.0 / self.tune_alpha) / (self.n * var_prev))
        self._xs = xs
        self._lam = np.minimum(lam, BET_CAP)

    def __repr__(self) -> str:
        return (f"BettingBound(n={self.n}, mean={self.x.mean():.6g}, "
                f"tune_alpha={self.tune_alpha!r}, orders={self._xs.shape[0]})")

    def log_evalue(self, m: float, side: str) -> float:
        """log E(m): side "upper" bets that the mean is below m, "lower" that it is above."""
        m = _check_unit_interval("m", m, closed=True)
        if side == "upper":
            steps = np.log1p(self._lam * (m - self._xs))
        elif side == "lower":
            steps = np.log1p(self._lam * (self._xs - m))
        else:
            raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")
        log_k = steps.sum(axis=1)
        top = float(log_k.max())
        return top + math.log(float(np.mean(np.exp(log_k - top))))

    def p_value(self, m0: float, alternative: str) -> float:
        """min(1, 1/E): "less" tests H0 μ ≥ m0 (vs μ < m0), "greater" tests H0 μ ≤ m0."""
        if alternative not in ("less", "greater"):
            raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
        log_e = self.log_evalue(m0, "upper" if alternative == "less" else "lower")
        return float(min(1.0, math.exp(-log_e))) if log_e > -700 else 1.0

    def bound(self, alpha: float, side: str) -> float:
        """One-sided bound at level alpha: P(μ > upper) ≤ alpha, P(μ < lower) ≤ alpha.

        The bound is the edge of the confidence set {m : E(m) < 1/alpha} rounded outward to
        the nearest float whose capital reaches 1/alpha (see :func:`_boundary`)."""
        validate_confidence(alpha, name="alpha")
        if side not in ("upper", "lower"):
            raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")
        target = math.log(1.0 / alpha)
        gap = lambda m: self.log_evalue(m, side) - target  # increasing (upper) / decreasing
        if side == "upper":
            if gap(1.0) < 0:
                return 1.0
            if gap(0.0) >= 0:
                return 0.0
            return _boundary(gap, 0.0, 1.0)
        if gap(0.0) < 0:
            return 0.0
        if gap(1.0) >= 0:
            return 1.0
        return _boundary(gap, 1.0, 0.0)

    def interval(self, confidence: float = 0.95, side: str = "two-sided"
                 ) -> tuple[float, float]:
        """(lower, upper) at ``confidence``; two-sided spends (1 − confidence)/2 per side."""
        validate_confidence(confidence)
        if side not in _SIDES:
            raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
        alpha = 1.0 - confidence
        tail = alpha / 2 if side == "two-sided" else alpha
        lo = self.bound(tail, "lower") if side != "upper" else 0.0
        hi = self.bound(tail, "upper") if side != "lower" else 1.0
        return lo, hi


def betting_interval(x: Sequence[float] | np.ndarray, confidence: float = 0.95,
                     side: str = "two-sided") -> tuple[float, float]:
    """Betting confidence interval for the common mean μ of independent X_i in [0, 1].

    ``BettingBound(x, tune_alpha).interval(confidence, side)`` with the bets tuned for the
    level each side is spent at: with probability at least ``confidence`` the interval holds
    μ (see :class:`BettingBound` for the assumptions and the method).
    """
    validate_confidence(confidence)
    tail = (1.0 - confidence) / (2 if side == "two-sided" else 1)
    return BettingBound(x, tune_alpha=tail).interval(confidence, side)


# --------------------------------------------------------------------------- paired


def _tango_nuisance(b: int, c: int, n: int, delta: float) -> float:
    """Restricted MLE of q_c (the cell counted by c) under q_b − q_c = delta (Tango 1998)."""
    a2 = 2.0 * n
    bq = -b - c + (2.0 * n - b + c) * delta
    cq = -c * delta * (1.0 - delta)
    disc = max(0.0, bq * bq - 4.0 * a2 * cq)
    return max(0.0, (math.sqrt(disc) - bq) / (2.0 * a2))


def tango_score(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: q_b − q_c = delta in a paired 2×2 table.

    b, c: the discordant counts (cells with probabilities q_b, q_c) among n pairs.
    T = (b − c − n·delta) / sqrt(n (2 q̃_c + delta (1 − delta))), q̃_c the MLE of q_c restricted
    to q_b − q_c = delta. Asymptotically N(0, 1) under H0. 0/0 (no discordant pair and
    delta = 0) is 0.
    """
    num = b - c - n * delta
    var = n * (2.0 * _tango_nuisance(b, c, n, delta) + delta * (1.0 - delta))
    if var <= 0.0:
        return 0.0 if num == 0 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def tango_interval(b: int, c: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Tango's (1998) score interval for the paired difference Δ = q_b − q_c.

    Setting: n independent pairs, each in one of four cells of a 2×2 table (multinomial);
    b pairs fall in the cell of probability q_b (e.g. "only version B is right"), c in the cell
    of probability q_c ("only A is right"); Δ = q_b − q_c is the difference of the two
    versions' success rates on the population of pairs. Unconditional: it does not condition
    on b + c, so it is not degenerate when b + c = 0 (then it is ±z²/(n + z²)).

    The interval is {Δ : |T(Δ)| ≤ z_{1−α/2}} (:func:`tango_score`), endpoints found by
    root-finding (T decreases in Δ). Coverage is asymptotic, not exact: close to
    ``confidence`` for moderate n (Tango 1998; Newcombe 1998), checked in
    tests/test_paired_interval.py by exact enumeration of the multinomial.
    """
    from scipy.optimize import brentq as _brentq

    # scipy's inferred signature: rtol a float64, and full_output's tuple in the return
    brentq = cast(Callable[..., float], _brentq)

    n = _check_int("n", n, 1)
    b = _check_int("b", b, 0)
    c = _check_int("c", c, 0)
    if b + c > n:
        raise ValueError(f"b + c must be <= n, got b={b}, c={c}, n={n}")
    validate_confidence(confidence)
    z = float(_sp.ndtri(0.5 + confidence / 2))  # = scipy.stats.norm.ppf
    d_hat = (b - c) / n
    edge = 1.0 - 1e-15
    if b == n:
        hi = 1.0
    else:
        f_hi = lambda d: tango_score(b, c, n, d) + z
        hi = 1.0 if f_hi(edge) >= 0 else brentq(f_hi, d_hat, edge, xtol=1e-13, rtol=1e-13)
    if c == n:
        lo = -1.0
    else:
        f_lo = lambda d: tango_score(b, c, n, d) - z
        lo = -1.0 if f_lo(-edge) <= 0 else brentq(f_lo, -edge, d_hat, xtol=1e-13, rtol=1e-13)
    return float(lo), float(hi)


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
