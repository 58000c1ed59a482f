"""Bounds for clustered draws (several noise draws per evaluation point): the betting bound of
stats.BettingBound against brute force and closed forms, its coverage by simulation, and its
use by Proportion, the verdict and the certificate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as st

from robust_cert import stats, verdict
from robust_cert.certificate import proportion_to_dict
from robust_cert.metrics.base import (
    EVALUATION_SET_POPULATION,
    MetricResult,
    Proportion,
)
from robust_cert.policy import Policy

# --------------------------------------------------------------------------- brute force


def _plugin_bets(seq: list[float], tune_alpha: float, n: int) -> list[float]:
    """The predictable plug-in bets, one observation at a time (plain Python)."""
    bets, total, sq = [], 0.0, 0.0
    var_prev = 0.25
    for t, x in enumerate(seq, start=1):
        bets.append(min(stats.BET_CAP, math.sqrt(2 * math.log(1 / tune_alpha) / (n * var_prev))))
        total += x
        mu = (0.5 + total) / (t + 1)
        sq += (x - mu) ** 2
        var_prev = (0.25 + sq) / (t + 1)
    return bets


def _evalue(x: np.ndarray, m: float, side: str, tune_alpha: float, orders: int, seed: int):
    """Average capital over the same seeded orders, computed term by term."""
    rng = np.random.default_rng(seed)
    caps = []
    for _ in range(orders):
        seq = [float(v) for v in x[rng.permutation(len(x))]]
        cap = 1.0
        for lam, v in zip(_plugin_bets(seq, tune_alpha, len(x)), seq, strict=True):
            cap *= 1 + lam * ((m - v) if side == "upper" else (v - m))
        caps.append(cap)
    return sum(caps) / len(caps)


@pytest.mark.parametrize(("side", "a"), [("upper", 0.3), ("lower", 2.0)])
def test_evalue_and_bound_match_a_term_by_term_computation(side: str, a: float) -> None:
    rng = np.random.default_rng(7)
    x = rng.binomial(8, rng.beta(a, 4, 60)) / 8
    bb = stats.BettingBound(x, tune_alpha=0.05, orders=4, seed=11)
    for m in (0.01, 0.1, 0.3):
        assert math.exp(bb.log_evalue(m, side)) == pytest.approx(
            _evalue(x, m, side, 0.05, 4, 11), rel=1e-10)
    bound = bb.bound(0.05, side)
    # the bound is where the capital reaches 1/α (found here by Brent's method)
    ref = optimize.brentq(lambda m: _evalue(x, m, side, 0.05, 4, 11) - 20, 1e-9, 1 - 1e-9,
                          xtol=1e-13)
    assert bound == pytest.approx(ref, abs=1e-9)
    # rounded outward: never on the wrong side of the exact root
    assert (bound >= ref - 1e-15) if side == "upper" else (bound <= ref + 1e-15)


def test_all_zero_rates_known_answer() -> None:
    """All rates 0: every order is the same, the capital is ∏(1 + λ_t m) and the upper bound
    solves ∏(1 + λ_t m) = 1/α; it is near ln(1/α)/(0.9·n) — set by the number of points."""
    n = 359
    bets = _plugin_bets([0.0] * n, 0.05, n)
    ref = optimize.brentq(lambda m: sum(math.log1p(b * m) for b in bets) - math.log(20),
                          1e-9, 1.0, xtol=1e-14)
    upper = stats.BettingBound(np.zeros(n), tune_alpha=0.05).bound(0.05, "upper")
    assert upper == pytest.approx(ref, abs=1e-10)
    assert math.log(20) / (0.9 * n) <= upper < 1.1 * math.log(20) / (0.9 * n)
    assert stats.BettingBound(np.zeros(n)).bound(0.05, "lower") == 0.0


def test_pvalue_and_bound_are_dual() -> None:
    """p ≤ a exactly when the bound at a excludes the threshold (same tuning)."""
    rng = np.random.default_rng(2)
    x = rng.binomial(5, rng.beta(0.2, 6, 300)) / 5
    bb = stats.BettingBound(x, tune_alpha=0.05)
    for a in (0.05, 0.01, 0.002):
        up, lo = bb.bound(a, "upper"), bb.bound(a, "lower")
        assert bb.p_value(up + 1e-9, "less") <= a < bb.p_value(up - 1e-9, "less")
        assert bb.p_value(lo - 1e-9, "greater") <= a < bb.p_value(lo + 1e-9, "greater")
        assert lo <= x.mean() <= up


def test_two_sided_interval_and_argument_checks() -> None:
    x = np.r_[np.zeros(50), np.ones(50)]
    lo, hi = stats.betting_interval(x, 0.95)
    assert lo < 0.5 < hi
    assert hi - 0.5 == pytest.approx(0.5 - lo, abs=0.02)  # symmetric data, nearly symmetric
    # the bets are tuned for the level each side is spent at, (1 - 0.95) / 2, which is
    # 0.025000000000000022 in floats: tuned for the literal 0.025 instead, the lower end
    # moves by one float spacing on some CPUs (seen on an AVX-512 host)
    assert stats.BettingBound(x, (1 - 0.95) / 2).interval(0.95) == (lo, hi)
    assert stats.BettingBound(x, 0.025).interval(0.95) == pytest.approx((lo, hi), abs=1e-12)
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        stats.BettingBound([0.5, 1.2])
    with pytest.raises(ValueError, match="non-empty"):
        stats.BettingBound([])
    with pytest.raises(ValueError, match="side"):
        stats.BettingBound(x).bound(0.05, "both")


# --------------------------------------------------------------------------- coverage


def _clustered_sample(rng, a: float, b: float, points: int, draws: int):
    """Per-point failure rates p_i ~ Beta(a, b); draws allotted to points uniformly at random
    (as probabilistic_robustness does); failures ~ Binomial(draws_i, p_i)."""
    p = rng.beta(a, b, points)
    per_point = np.bincount(rng.integers(points, size=draws), minlength=points)
    return rng.binomial(per_point, p), per_point


def _floor(reps: int, level: float) -> float:
    """Coverage below this has probability ≤ 0.001 if the true coverage is ``level``."""
    return st.binom.ppf(0.001, reps, level) / reps


def test_population_bound_covers_and_pooled_clopper_pearson_does_not() -> None:
    """The demo's shape: 359 points, 2,995 draws, failures concentrated on a few points
    (Beta(0.05, 6) rates, mean 0.83%). The 95% betting upper bound covers the population
    rate in at least nominal-minus-slack of 300 replicates; the pooled Clopper–Pearson bound
    (what the report showed) does not — about 90%."""
    rng = np.random.default_rng(2024)
    reps, a, b = 300, 0.05, 6.0
    mu = a / (a + b)
    bet = pooled = 0
    for _ in range(reps):
        k, m = _clustered_sample(rng, a, b, 359, 2995)
        prop = Proportion({"eps": 0.1}, int(k.sum()), int(m.sum()), cluster_k=k, cluster_n=m)
        bet += prop.bound(0.05, "upper") >= mu
        pooled += stats.clopper_pearson(int(k.sum()), 2995, 0.95, "upper")[1] >= mu
    assert bet / reps >= _floor(reps, 0.95)
    assert pooled / reps < _floor(reps, 0.95)


def test_two_sided_coverage_with_spread_out_rates() -> None:
    """Rates spread over [0, 1] (Beta(2, 3)), 120 points with 3 draws each on average: the
    two-sided 90% interval covers in at least nominal-minus-slack of 300 replicates."""
    rng = np.random.default_rng(99)
    reps, a, b = 300, 2.0, 3.0
    hits = 0
    for _ in range(reps):
        k, m = _clustered_sample(rng, a, b, 120, 360)
        keep = m > 0
        lo, hi = stats.betting_interval(k[keep] / m[keep], 0.90)
        hits += lo <= a / (a + b) <= hi
    assert hits / reps >= _floor(reps, 0.90)


# --------------------------------------------------------------------------- Proportion


#: (failures, draws) of the 11 failing points of the demo's version 1 (standard training,
#: seed 0, ε = 0.1, 2,995 draws on 359 points); the other 348 points never failed.
DEMO_V1_FAILING = [(1, 9), (1, 7), (2, 9), (2, 7), (5, 5), (5, 5), (1, 3), (1, 4), (1, 10),
                   (1, 11), (5, 11)]


def _demo_like() -> Proportion:
    """25 failures on 11 of 359 points, 2,995 draws: the demo's version 1."""
    k = np.zeros(359, dtype=np.int64)
    m = np.full(359, 8, dtype=np.int64)
    k[:11], m[:11] = np.array(DEMO_V1_FAILING).T
    m[11:11 + 130] = 9  # 81 + 130·9 + 218·8 = 2,995 draws
    return Proportion({"eps": 0.1}, 25, 2995, cluster_k=k, cluster_n=m)


def test_proportion_checks_and_dispatch() -> None:
    prop = _demo_like()
    assert prop.clustered
    assert prop.points == 359
    assert prop.interval_method.startswith("betting")
    assert prop.rates() == pytest.approx(prop.cluster_k / prop.cluster_n)
    plain = Proportion({}, 25, 2995)
    assert not plain.clustered
    assert plain.bound(0.05, "upper") == stats.clopper_pearson(25, 2995, 0.95, "upper")[1]
    assert plain.p_value(0.02, "less") == stats.binom_test_pvalue(25, 2995, 0.02, "less")
    assert prop.conditional_ci(0.95) == plain.ci(0.95)
    with pytest.raises(ValueError, match="sum to"):
        Proportion({}, 24, 2995, cluster_k=prop.cluster_k, cluster_n=prop.cluster_n)
    with pytest.raises(ValueError, match="go together"):
        Proportion({}, 25, 2995, cluster_k=prop.cluster_k)


def test_shards_merge_into_the_whole() -> None:
    whole = _demo_like()
    cut = 200
    halves = [Proportion({"eps": 0.1}, int(whole.cluster_k[s].sum()),
                         int(whole.cluster_n[s].sum()), whole.cluster_k[s], whole.cluster_n[s])
              for s in (slice(None, cut), slice(cut, None))]
    merged = halves[0].merged(halves[1])
    assert (merged.k, merged.n) == (whole.k, whole.n)
    assert merged.bound(0.05, "upper") == whole.bound(0.05, "upper")
    with pytest.raises(ValueError, match="different kinds"):
        halves[0].merged(Proportion({"eps": 0.1}, 1, 10))


def _policy(threshold: float) -> Policy:
    return Policy.from_dict({
        "name": "clustered", "confidence": 0.95,
        "metrics": {"probabilistic_robustness": {"eps": 0.1}},
        "requirements": [{"metric": "probabilistic_robustness", "eps": 0.1,
                          "at_most": threshold}]})


def _result(prop: Proportion) -> dict[str, MetricResult]:
    return {"probabilistic_robustness": MetricResult(
        "probabilistic_robustness", "statistical", "failure rate", False, "", {}, [prop])}


def test_verdict_uses_the_population_bound() -> None:
    """The demo's version 1: pooled Clopper–Pearson PASSed "failure rate ≤ 2%" (upper bound
    1.16%, p = 2.3e-7); for the population the 25 failures come from 11 points, two of which
    failed every draw, the betting upper bound is 2.84% and the requirement is not
    demonstrated."""
    prop = _demo_like()
    assert stats.clopper_pearson(25, 2995, 0.95, "upper")[1] < 0.0125
    assert stats.binom_test_pvalue(25, 2995, 0.02, "less") < 1e-6
    overall, (o,) = verdict.decide(_policy(0.02), _result(prop))
    assert o.verdict == verdict.INCONCLUSIVE
    assert overall == verdict.INCONCLUSIVE
    assert o.bound == pytest.approx(prop.bound(0.05, "upper", tune_alpha=0.05))
    assert o.bound > 0.02
    assert o.p_value == pytest.approx(prop.p_value(0.02, "less", tune_alpha=0.05))
    assert o.p_value > 0.05
    assert o.ci == prop.ci(0.95)
    assert o.interval_method.startswith("betting")
    assert "per-point" in o.population
    # a threshold the points do demonstrate passes, with the bound below it
    _, (o2,) = verdict.decide(_policy(0.05), _result(prop))
    assert o2.verdict == verdict.PASS
    assert o2.bound <= 0.05
    assert o2.p_value <= 0.05


def test_certificate_states_what_each_interval_covers() -> None:
    prop = _demo_like()
    d = proportion_to_dict(prop, 0.95)
    assert d["ci"] == list(prop.ci(0.95))
    assert d["interval_method"] == prop.interval_method
    assert d["points"] == 359
    assert d["conditional_ci"]["population"] == EVALUATION_SET_POPULATION
    assert d["conditional_ci"]["ci"] == list(stats.clopper_pearson(25, 2995, 0.95))
    assert d["conditional_ci"]["ci"][1] < d["ci"][1]
    plain = proportion_to_dict(Proportion({}, 300, 359), 0.95)
    assert plain["ci"] == list(stats.clopper_pearson(300, 359, 0.95))
    assert "conditional_ci" not in plain
    assert plain["population"].startswith("inputs drawn like the evaluation points")


def test_verdict_fails_on_the_population_lower_bound() -> None:
    """Half of 200 points fail every one of their 10 draws: the betting lower bound at the
    Holm level is far above 2%, so the requirement FAILs, citing that bound."""
    k = np.r_[np.full(100, 10), np.zeros(100, dtype=np.int64)]
    prop = Proportion({"eps": 0.1}, 1000, 2000, cluster_k=k, cluster_n=np.full(200, 10))
    _, (o,) = verdict.decide(_policy(0.02), _result(prop))
    assert o.verdict == verdict.FAIL
    lower = prop.bound(o.level, "lower", tune_alpha=0.05)
    assert 0.02 < lower < 0.5
    assert f"lower bound {lower:.4g} is above the threshold 0.02" in o.reason


@pytest.mark.parametrize("side", ["upper", "lower"])
def test_bound_is_the_outermost_float_whose_capital_reaches_one_over_alpha(side: str) -> None:
    """Rounded outward by less than one float spacing: the capital at the bound reaches 1/α
    (the bound itself is excluded from the confidence set), and at the next float inward it
    does not."""
    rng = np.random.default_rng(5)
    x = rng.binomial(10, rng.beta(0.3, 5, 359)) / 10
    bb = stats.BettingBound(x, tune_alpha=0.05)
    bound = bb.bound(0.05, side)
    inward = np.nextafter(bound, 0.0 if side == "upper" else 1.0)
    assert bb.log_evalue(bound, side) >= math.log(20)
    assert bb.log_evalue(float(inward), side) < math.log(20)
