"""Tango's score interval for a paired difference of proportions (stats.tango_interval) and its
use in `compare`: known answers, a brute-force implementation, exact coverage by enumerating
the multinomial, and verdict wording that never contradicts the interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as st

from robust_cert import stats
from robust_cert.comparison import BETTER, PAIRED_CLUSTERS, SAME, WORSE, compare
from tests.helpers import paired as _pair

Z95 = float(st.norm.ppf(0.975))


# --------------------------------------------------------------------------- brute force


def _restricted_mle(b: int, c: int, n: int, delta: float) -> float:
    """MLE of q_c under q_b = q_c + delta, by numerical maximisation of the multinomial
    likelihood b·log q_b + c·log q_c + (n − b − c)·log(1 − q_b − q_c) (no closed form used)."""
    lo, hi = max(0.0, -delta), (1.0 - delta) / 2.0  # q_c ≥ 0, q_b ≥ 0, q_b + q_c ≤ 1
    if hi - lo < 1e-15:
        return lo

    def nll(qc: float) -> float:
        qb, rest = qc + delta, 1.0 - 2.0 * qc - delta
        out = 0.0
        for count, prob in ((b, qb), (c, qc), (n - b - c, rest)):
            if count:
                out -= count * math.log(max(prob, 1e-300))
        return out

    res = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-13})
    # the optimum can sit on the boundary, where "bounded" stops just inside
    return min((lo, hi, res.x), key=nll)


def _score(b: int, c: int, n: int, delta: float) -> float:
    qc = _restricted_mle(b, c, n, delta)
    qb = qc + delta
    var = n * (qb + qc - delta ** 2)  # n·Var((b − c)/n) under the restricted fit
    num = b - c - n * delta
    return 0.0 if var <= 0 and num == 0 else num / math.sqrt(var)


def _brute_interval(b: int, c: int, n: int, z: float) -> tuple[float, float]:
    """{Δ : |T(Δ)| ≤ z}, scanning a grid and refining each sign change by bisection."""
    grid = np.linspace(-1 + 1e-9, 1 - 1e-9, 801)
    inside = np.array([abs(_score(b, c, n, d)) <= z for d in grid])
    idx = np.flatnonzero(inside)
    lo_i, hi_i = idx[0], idx[-1]

    def edge(a: float, bb: float) -> float:  # a inside, bb outside
        for _ in range(45):
            mid = 0.5 * (a + bb)
            a, bb = (mid, bb) if abs(_score(b, c, n, mid)) <= z else (a, mid)
        return 0.5 * (a + bb)

    lo = grid[0] if lo_i == 0 else edge(grid[lo_i], grid[lo_i - 1])
    hi = grid[-1] if hi_i == len(grid) - 1 else edge(grid[hi_i], grid[hi_i + 1])
    return lo, hi


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("n", [1, 10, 100, 357])
def test_no_discordant_pair_gives_the_closed_form(n: int) -> None:
    """b = c = 0: T(Δ) = −sign(Δ)·sqrt(n|Δ|/(1 − |Δ|)), so the interval is ±z²/(n + z²)."""
    half = Z95 ** 2 / (n + Z95 ** 2)
    assert stats.tango_interval(0, 0, n) == pytest.approx((-half, half), abs=1e-10)


def test_all_pairs_discordant_one_way() -> None:
    """b = n: no concordant pair, so q̃_c = (1 − Δ)/2, the variance term is 1 − Δ² and
    T(Δ) = sqrt(n(1 − Δ)/(1 + Δ)); the lower end is (n − z²)/(n + z²), the upper end 1."""
    for n in (5, 50):
        lo, hi = stats.tango_interval(n, 0, n)
        assert hi == 1.0
        assert lo == pytest.approx((n - Z95 ** 2) / (n + Z95 ** 2), abs=1e-10)
        assert stats.tango_interval(0, n, n) == pytest.approx((-1.0, -lo), abs=1e-10)


@pytest.mark.parametrize(("b", "c", "n"), [(17, 3, 200), (1, 7, 44), (0, 4, 30), (30, 1, 31),
                                           (103, 3, 357)])
def test_matches_a_brute_force_score_inversion(b: int, c: int, n: int) -> None:
    lo, hi = stats.tango_interval(b, c, n)
    blo, bhi = _brute_interval(b, c, n, Z95)
    assert lo == pytest.approx(blo, abs=2e-6)
    assert hi == pytest.approx(bhi, abs=2e-6)
    assert lo <= (b - c) / n <= hi


@pytest.mark.parametrize(("b", "c", "n", "delta"), [(17, 3, 200, 0.01), (1, 7, 44, -0.3),
                                                    (0, 0, 10, 0.2), (5, 0, 9, -0.05),
                                                    (12, 12, 30, 0.4)])
def test_score_statistic_matches_the_numerical_mle(b, c, n, delta) -> None:
    assert stats.tango_score(b, c, n, delta) == pytest.approx(_score(b, c, n, delta), rel=1e-6,
                                                              abs=1e-9)


def test_symmetry_and_level() -> None:
    lo, hi = stats.tango_interval(12, 4, 60, 0.95)
    assert stats.tango_interval(4, 12, 60, 0.95) == pytest.approx((-hi, -lo), abs=1e-12)
    lo99, hi99 = stats.tango_interval(12, 4, 60, 0.99)
    assert lo99 < lo
    assert hi99 > hi


@pytest.mark.parametrize(("args", "match"), [((3, 2, 4), "b \\+ c"), ((-1, 0, 5), "b must"),
                                             ((1, 1, 0), "n must"), ((1, 1, 5, 1.0), "confidence")])
def test_bad_arguments(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        stats.tango_interval(*args)


# --------------------------------------------------------------------------- coverage


def _old_conditional(b: int, c: int, n: int) -> tuple[float, float]:
    """The interval compare used before: CP on the split of the m = b + c discordant pairs,
    scaled by m/n (conditional on m; the single value 0 when m = 0)."""
    m = b + c
    if m == 0:
        return 0.0, 0.0
    lo, hi = stats.clopper_pearson(b, m, 0.95)
    return m / n * (2 * lo - 1), m / n * (2 * hi - 1)


def _exact_coverage(n: int, qb: float, qc: float, interval) -> float:
    """P(interval holds q_b − q_c), summed exactly over every multinomial table of n pairs."""
    delta = qb - qc
    total = 0.0
    for b in range(n + 1):
        cs = np.arange(n - b + 1)
        probs = st.multinomial.pmf(np.stack([np.full_like(cs, b), cs, n - b - cs], 1), n,
                                   [qb, qc, 1 - qb - qc])
        for c, pr in zip(cs, probs, strict=True):
            if pr > 1e-15:
                lo, hi = interval(b, int(c), n)
                total += pr * (lo - 1e-12 <= delta <= hi + 1e-12)
    return total


@pytest.fixture(scope="module")
def tango40():
    n = 40
    table = {(b, c): stats.tango_interval(b, c, n) for b in range(n + 1)
             for c in range(n + 1 - b)}
    return lambda b, c, n: table[(b, c)]


@pytest.mark.parametrize(("qb", "qc"), [(0.1, 0.1), (0.3, 0.1), (0.05, 0.0), (0.02, 0.01),
                                        (0.0, 0.0), (0.45, 0.25), (0.28, 0.01), (0.6, 0.02)])
def test_exact_coverage_is_close_to_nominal(tango40, qb: float, qc: float) -> None:
    """Exact coverage (no simulation error) of the 95% interval with 40 pairs. Tango's
    interval is asymptotic: coverage stays within a point or so of 95% where discordant
    pairs are common and is conservative where they are rare (incl. none at all)."""
    cov = _exact_coverage(40, qb, qc, tango40)
    assert cov >= 0.935
    if qb + qc >= 0.2:
        assert cov <= 0.97


def test_the_old_conditional_interval_undercovers() -> None:
    """What the test above guards against: with the demo's lopsided split (28% of pairs good
    only in B, 1% only in A) the conditional interval, which ignores the variation of the
    number of discordant pairs, covers Δ only 62% of the time (Tango's: 95.4%)."""
    assert _exact_coverage(40, 0.28, 0.01, _old_conditional) < 0.65


def test_simulated_coverage_on_a_demo_sized_table() -> None:
    """357 pairs with the demo's v1-vs-v2 split (about 28% only-v2, 1% only-v1) and with no
    difference: the coverage of 400 simulated tables is at least nominal minus the exact
    binomial slack (probability ≤ 0.001 of failing if the true coverage is 95%)."""
    rng = np.random.default_rng(12)
    reps, n = 400, 357
    floor = st.binom.ppf(0.001, reps, 0.95) / reps
    for qb, qc in ((0.28, 0.01), (0.08, 0.08)):
        tables = rng.multinomial(n, [qb, qc, 1 - qb - qc], size=reps)
        hits = 0
        for b, c, _ in tables:
            lo, hi = stats.tango_interval(int(b), int(c), n)
            hits += lo <= qb - qc <= hi
        assert hits / reps >= floor


# --------------------------------------------------------------------------- in compare


def test_demo_like_comparison_reports_the_unconditional_interval() -> None:
    """v2 − v1 on 357 points with 103 only-v2 and 3 only-v1 (robust accuracy): the interval is
    Tango's, wider than the conditional one the issue measured, and the verdict agrees."""
    a, b = _pair(357, a_only=3, b_only=103, both=150)
    (q,) = compare({"r": (a, True)}, {"r": (b, True)})
    assert q.delta_ci == pytest.approx(stats.tango_interval(103, 3, 357), abs=1e-12)
    old = _old_conditional(103, 3, 357)
    assert q.delta_ci[0] < old[0]
    assert q.delta_ci[1] > old[1]
    assert q.verdict == BETTER
    assert q.note == ""


def test_verdict_never_contradicts_the_interval() -> None:
    """Over many random tables: BETTER ⇒ interval above 0, WORSE ⇒ below 0, and a SAME whose
    interval excludes 0 (or whose McNemar rejects) carries a note saying why."""
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(300):
        n = int(rng.integers(5, 120))
        a_only, b_only = rng.multinomial(n, [0.1, 0.15, 0.75])[:2]
        a, b = _pair(n, int(a_only), int(b_only))
        (q,) = compare({"x": (a, True)}, {"x": (b, True)})
        seen.add(q.verdict)
        lo, hi = q.delta_ci
        if q.verdict == BETTER:
            assert lo > 0
        elif q.verdict == WORSE:
            assert hi < 0
        elif lo > 0 or hi < 0 or q.adjusted_p_value <= 0.05:
            assert q.note
    assert seen == {BETTER, WORSE, SAME}


def test_interval_excluding_zero_without_holm_rejection_is_explained() -> None:
    """b = 1, c = 7 of 44: Tango's 95% interval excludes 0 but the exact McNemar p-value is
    0.0703, so the verdict stays "no detectable difference", with a note."""
    a, b = _pair(44, a_only=1, b_only=7)
    (q,) = compare({"x": (a, True)}, {"x": (b, True)})
    assert q.p_value == pytest.approx(2 * st.binom.cdf(1, 8, 0.5))
    assert q.delta_ci[0] > 0
    assert q.verdict == SAME
    assert "McNemar does not reject" in q.note


# --------------------------------------------------------------------------- clustered draws


def _clustered_pair(rng, points: int, draws: int, p_a, p_b):
    """Draws allotted to points at random; per draw, A and B fail independently with the
    point's rates (p_a[i], p_b[i]). Returns (a_good, b_good, index) over draws."""
    index = rng.integers(points, size=draws)
    a_good = rng.random(draws) >= p_a[index]
    b_good = rng.random(draws) >= p_b[index]
    return a_good, b_good, index


def test_noise_draws_are_compared_per_point() -> None:
    """20 of 100 points fail every draw under A and none under B: 200 discordant draws, all
    one way. McNemar and Tango on the draws would treat them as 1,000 independent pairs; the
    clustered comparison uses the 100 per-point differences instead (wider interval)."""
    index = np.repeat(np.arange(100), 10)
    a_good = index >= 20
    b_good = np.ones(1000, bool)
    (q,) = compare({"p": (a_good, False, index)}, {"p": (b_good, False, index)})
    assert q.method == PAIRED_CLUSTERS
    assert (q.a_only, q.b_only) == (0, 200)
    y = np.r_[np.ones(20), np.full(80, 0.5)]  # (d_i + 1)/2
    lo, hi = stats.BettingBound(y, tune_alpha=0.025).interval(0.95)
    # reported for the failure rate: minus the good-rate interval
    assert q.delta_ci == pytest.approx((-(2 * hi - 1), -(2 * lo - 1)), abs=1e-12)
    assert q.delta == pytest.approx(-0.2)
    assert q.delta_ci[0] <= q.delta <= q.delta_ci[1]
    tango = stats.tango_interval(200, 0, 1000)
    assert q.delta_ci[1] - q.delta_ci[0] > tango[1] - tango[0]
    assert q.verdict == BETTER


def test_identical_versions_on_noise_draws() -> None:
    index = np.repeat(np.arange(50), 4)
    good = np.arange(200) % 3 > 0
    (q,) = compare({"p": (good, False, index)}, {"p": (good.copy(), False, index)})
    assert q.p_value == 1.0
    assert q.verdict == SAME
    assert q.delta_ci[0] == pytest.approx(-q.delta_ci[1], abs=1e-9)
    assert q.delta_ci[0] < 0 < q.delta_ci[1]


def test_clustered_comparison_coverage() -> None:
    """Per-point failure rates of A and B differ from point to point (Beta), 80 points,
    400 draws: the 95% interval covers the population Δ in at least nominal-minus-slack of 200
    replicates (Δ = E p_a − E p_b in good-rate terms, B − A)."""
    rng = np.random.default_rng(8)
    reps, points = 200, 80
    floor = st.binom.ppf(0.001, reps, 0.95) / reps
    delta = 0.3 - 0.2  # E p_a = 0.3, E p_b = 0.2: B's good rate is 0.1 higher
    hits = 0
    for _ in range(reps):
        p_a, p_b = rng.beta(3, 7, points), rng.beta(2, 8, points)
        a_good, b_good, index = _clustered_pair(rng, points, 400, p_a, p_b)
        (q,) = compare({"p": (a_good, True, index)}, {"p": (b_good, True, index)})
        hits += q.delta_ci[0] <= delta <= q.delta_ci[1]
    assert hits / reps >= floor
