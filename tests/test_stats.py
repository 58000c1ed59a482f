"""Known-answer and simulation tests for robust_cert.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from robust_cert.stats import (
    SPRT,
    HolmResult,
    binom_test_pvalue,
    clopper_pearson,
    holm,
    mcnemar_exact,
    validate_confidence,
    zero_failure_sample_size,
)

KN = [(0, 1), (1, 1), (0, 10), (3, 10), (10, 10), (0, 299), (5, 1000), (999, 1000), (17, 40)]


# --------------------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize(("k", "n"), KN)
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_clopper_pearson_two_sided_matches_scipy(k: int, n: int, confidence: float) -> None:
    ref = st.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    lo, hi = clopper_pearson(k, n, confidence)
    # scipy finds the bounds with brentq (xtol 2e-12), we use beta.ppf
    assert lo == pytest.approx(ref.low, abs=1e-11)
    assert hi == pytest.approx(ref.high, abs=1e-11)
    if k == 0:
        assert lo == 0.0
    if k == n:
        assert hi == 1.0


@pytest.mark.parametrize(("k", "n"), KN)
def test_clopper_pearson_one_sided(k: int, n: int) -> None:
    alpha = 0.05
    lo, hi = clopper_pearson(k, n, 1 - alpha, side="lower")
    assert hi == 1.0
    assert lo == (0.0 if k == 0 else pytest.approx(st.beta.ppf(alpha, k, n - k + 1), rel=1e-12))
    ref = st.binomtest(k, n, alternative="greater").proportion_ci(1 - alpha, method="exact")
    assert lo == pytest.approx(ref.low, abs=1e-11)

    lo, hi = clopper_pearson(k, n, 1 - alpha, side="upper")
    assert lo == 0.0
    ref = st.binomtest(k, n, alternative="less").proportion_ci(1 - alpha, method="exact")
    assert hi == pytest.approx(ref.high, abs=1e-11)


def test_clopper_pearson_zero_failures_known_value() -> None:
    # 0 events in 299 trials bounds the rate by 1% at 95%; 298 trials do not.
    assert clopper_pearson(0, 299, 0.95, side="upper")[1] <= 0.01
    assert clopper_pearson(0, 298, 0.95, side="upper")[1] > 0.01
    # closed form for k = 0: 1 - alpha^(1/n)
    assert clopper_pearson(0, 299, 0.95, "upper")[1] == pytest.approx(1 - 0.05 ** (1 / 299))


def test_clopper_pearson_two_sided_is_wider_than_one_sided() -> None:
    lo2, hi2 = clopper_pearson(7, 50, 0.95)
    assert lo2 < clopper_pearson(7, 50, 0.95, "lower")[0]
    assert hi2 > clopper_pearson(7, 50, 0.95, "upper")[1]


# --------------------------------------------------------------------------- binomial test


def test_binom_pvalue_ci_duality() -> None:
    rng = np.random.default_rng(12345)
    alpha = 0.05
    checked = 0
    for _ in range(400):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        p0 = float(rng.uniform(0.001, 0.999))
        pval = binom_test_pvalue(k, n, p0, "greater")
        if abs(pval - alpha) < 1e-8:  # too close to the boundary to compare
            continue
        lower = clopper_pearson(k, n, 1 - alpha, side="lower")[0]
        if abs(lower - p0) < 1e-10:
            continue
        assert (pval <= alpha) == (lower >= p0), (k, n, p0, pval, lower)
        checked += 1
    assert checked > 350


@pytest.mark.parametrize(("k", "n"), KN)
@pytest.mark.parametrize("p0", [0.001, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_binom_pvalue_matches_scipy(k: int, n: int, p0: float, alternative: str) -> None:
    ref = st.binomtest(k, n, p0, alternative=alternative).pvalue
    assert binom_test_pvalue(k, n, p0, alternative) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_binom_pvalue_known_values() -> None:
    # P(X >= 1 | 10, 0.1) = 1 - 0.9^10 ; P(X <= 0 | 10, 0.1) = 0.9^10
    assert binom_test_pvalue(1, 10, 0.1, "greater") == pytest.approx(1 - 0.9**10)
    assert binom_test_pvalue(0, 10, 0.1, "less") == pytest.approx(0.9**10)
    assert binom_test_pvalue(0, 10, 0.1, "greater") == 1.0


# --------------------------------------------------------------------------- Holm


def test_holm_hand_worked_example() -> None:
    # sorted: 0.005 (x4 = .02), 0.01 (x3 = .03), 0.03 (x2 = .06), 0.04 (x1 = .04 -> cummax .06)
    res = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert isinstance(res, HolmResult)
    assert res.adjusted == pytest.approx((0.03, 0.06, 0.06, 0.02))
    assert res.rejected == (True, False, False, True)
    assert res.levels == pytest.approx((0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4))
    # step-down: 0.005 <= .0125 and 0.01 <= .0167 reject, then 0.03 > .025 stops,
    # so 0.04 is retained although it is below its own level 0.05
    assert res.levels[1] >= 0.04
    assert not res.rejected[1]


def test_holm_ties_use_stable_order_and_clip_at_one() -> None:
    res = holm([0.5, 0.02, 0.02], alpha=0.05)
    assert res.levels == pytest.approx((0.05, 0.05 / 3, 0.05 / 2))
    assert res.adjusted == pytest.approx((0.5, 0.06, 0.06))
    assert holm([0.6, 0.7], alpha=0.05).adjusted == (1.0, 1.0)


def test_holm_adjusted_monotone_and_at_least_raw() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        p = rng.uniform(size=int(rng.integers(1, 20))) ** 3
        res = holm(p.tolist(), alpha=0.1)
        order = np.argsort(p, kind="stable")
        adj = np.asarray(res.adjusted)
        assert np.all(np.diff(adj[order]) >= 0)
        assert np.all(adj >= p)
        assert np.all(adj <= 1.0)
        assert tuple(bool(a <= 0.1) for a in adj) == res.rejected
        # step-down equivalence: rejected set = longest sorted prefix with p_(i) <= level_(i)
        lv = np.asarray(res.levels)[order]
        ok = p[order] <= lv
        prefix = int(np.argmin(ok)) if not ok.all() else len(ok)
        expected = np.zeros(len(p), dtype=bool)
        expected[order[:prefix]] = True
        assert tuple(expected.tolist()) == res.rejected


@pytest.mark.parametrize("p", [0.0, 0.01, 0.049, 0.05, 0.051, 0.7, 1.0])
def test_holm_single_hypothesis_is_raw_test(p: float) -> None:
    res = holm([p], alpha=0.05)
    assert res == HolmResult(adjusted=(p,), rejected=(p <= 0.05,), levels=(0.05,))


def test_holm_empty() -> None:
    assert holm([], alpha=0.05) == HolmResult((), (), ())


def test_holm_fwer_under_global_null() -> None:
    rng = np.random.default_rng(2024)
    alpha, families, m = 0.05, 2000, 5
    pvals = rng.uniform(size=(families, m))
    errors = sum(any(holm(row.tolist(), alpha).rejected) for row in pvals)
    fwer = errors / families
    se = math.sqrt(alpha * (1 - alpha) / families)
    assert fwer < alpha + 3 * se


@pytest.mark.parametrize(
    ("pvalues", "alpha", "match"),
    [
        ([0.1, 1.2], 0.05, r"pvalues\[1\].*1\.2"),
        ([-0.1], 0.05, r"pvalues\[0\]"),
        ([float("nan")], 0.05, r"pvalues\[0\]"),
        ([0.1], 0.0, "alpha"),
        ([0.1], 1.0, "alpha"),
    ],
)
def test_holm_bad_arguments(pvalues: list[float], alpha: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        holm(pvalues, alpha)


# --------------------------------------------------------------------------- zero failures


@pytest.mark.parametrize(
    ("p_max", "confidence", "expected"),
    [(1e-2, 0.95, 299), (1e-3, 0.95, 2995), (1e-4, 0.95, 29956), (0.5, 0.75, 2), (0.5, 0.5, 1)],
)
def test_zero_failure_sample_size(p_max: float, confidence: float, expected: int) -> None:
    n = zero_failure_sample_size(p_max, confidence)
    assert n == expected
    assert (1 - p_max) ** n <= 1 - confidence
    if n > 1:
        assert (1 - p_max) ** (n - 1) > 1 - confidence


def test_zero_failure_sample_size_agrees_with_clopper_pearson() -> None:
    for p_max, conf in [(0.01, 0.95), (0.02, 0.99), (0.005, 0.9)]:
        n = zero_failure_sample_size(p_max, conf)
        assert clopper_pearson(0, n, conf, "upper")[1] <= p_max
        assert clopper_pearson(0, n - 1, conf, "upper")[1] > p_max


# --------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    ("b", "c"), [(0, 1), (1, 0), (3, 3), (10, 2), (2, 10), (0, 12), (25, 40), (100, 130)]
)
def test_mcnemar_matches_scipy(b: int, c: int) -> None:
    ref = st.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-10)


def test_mcnemar_known_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 * 0.5**5)
    assert mcnemar_exact(4, 4) == 1.0


# --------------------------------------------------------------------------- SPRT


def test_sprt_known_answer_326() -> None:
    sprt = SPRT(p0=0.01, p1=0.001, alpha=0.05, beta=0.05)
    assert sprt.draws_to_accept_h1_without_failures() == 326
    decisions = []
    n = 0
    while True:
        n += 1
        decisions.append(sprt.decide(0, n))
        if decisions[-1] != "continue":
            break
    assert n == 326
    assert decisions[-1] == "H1"
    assert sprt.decide(0, 325) == "continue"


def test_sprt_boundaries_and_h0() -> None:
    sprt = SPRT(p0=0.01, p1=0.001)
    assert sprt.log_a == pytest.approx(math.log(19))
    assert sprt.log_b == pytest.approx(-math.log(19))
    # two early failures: llr = 2 ln(0.1) + 0 < -ln 19
    assert sprt.decide(2, 2) == "H0"
    assert sprt.decide(1, 1) == "continue"
    assert sprt.decide(0, 0) == "continue"


def test_sprt_decide_many_agrees_with_decide() -> None:
    sprt = SPRT(p0=0.02, p1=0.005, alpha=0.1, beta=0.2)
    draws = np.repeat(np.arange(0, 400, 7), 6)
    rng = np.random.default_rng(3)
    failures = np.minimum(draws, rng.integers(0, 6, size=draws.shape))
    out = sprt.decide_many(failures, draws)
    assert out.dtype == np.int8
    code = {"H1": 1, "H0": -1, "continue": 0}
    expected = [code[sprt.decide(int(f), int(d))] for f, d in zip(failures, draws, strict=True)]
    assert out.tolist() == expected
    assert set(out.tolist()) == {-1, 0, 1}


def _simulate_sprt(sprt: SPRT, p: float, n_seq: int, seed: int) -> np.ndarray:
    """Run n_seq independent SPRTs at failure rate p to their first decision (vectorised)."""
    rng = np.random.default_rng(seed)
    decision = np.zeros(n_seq, dtype=np.int8)
    failures = np.zeros(n_seq, dtype=np.int64)
    draws, chunk = 0, 256
    active = np.arange(n_seq)
    while active.size and draws < 100_000:
        fails = np.cumsum(rng.random((active.size, chunk)) < p, axis=1) + failures[active, None]
        d = draws + np.arange(1, chunk + 1)
        dec = sprt.decide_many(fails, d[None, :])
        hit = dec != 0
        first = np.argmax(hit, axis=1)
        done = hit.any(axis=1)
        decision[active[done]] = dec[done, first[done]]
        failures[active] = fails[:, -1]
        active = active[~done]
        draws += chunk
    assert active.size == 0
    return decision


def test_sprt_operating_characteristic() -> None:
    sprt = SPRT(p0=0.01, p1=0.001, alpha=0.05, beta=0.05)
    n_seq = 4000
    se = math.sqrt(0.05 * 0.95 / n_seq)
    at_p0 = _simulate_sprt(sprt, 0.01, n_seq, seed=11)
    assert np.mean(at_p0 == 1) <= sprt.alpha + 3 * se
    at_p1 = _simulate_sprt(sprt, 0.001, n_seq, seed=12)
    assert np.mean(at_p1 == -1) <= sprt.beta + 3 * se
    # and it mostly gets the right answer
    assert np.mean(at_p0 == -1) > 0.9
    assert np.mean(at_p1 == 1) > 0.9


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: validate_confidence(1.0), r"^confidence\b"),
        (lambda: validate_confidence(0.0), r"^confidence\b"),
        (lambda: validate_confidence(float("nan")), r"^confidence\b"),
        (lambda: clopper_pearson(3, 2), r"^k\b"),
        (lambda: clopper_pearson(-1, 2), r"^k\b"),
        (lambda: clopper_pearson(0, 0), r"^n\b"),
        (lambda: clopper_pearson(1.5, 2), r"^k\b"),
        (lambda: clopper_pearson(1, 2.0), r"^n\b"),
        (lambda: clopper_pearson(1, 2, 1.5), r"^confidence\b"),
        (lambda: clopper_pearson(1, 2, side="both"), r"^side\b"),
        (lambda: binom_test_pvalue(1, 2, 1.5, "greater"), r"^p0\b"),
        (lambda: binom_test_pvalue(1, 2, 0.5, "bigger"), r"^alternative\b"),
        (lambda: binom_test_pvalue(5, 2, 0.5, "less"), r"^k\b"),
        (lambda: zero_failure_sample_size(0.0), r"^p_max\b"),
        (lambda: zero_failure_sample_size(1.0), r"^p_max\b"),
        (lambda: zero_failure_sample_size(0.01, 1.0), r"^confidence\b"),
        (lambda: mcnemar_exact(-1, 2), r"^b\b"),
        (lambda: mcnemar_exact(1, 2.5), r"^c\b"),
        (lambda: SPRT(p0=0.001, p1=0.01), r"^p1\b"),
        (lambda: SPRT(p0=0.01, p1=0.01), r"^p1\b"),
        (lambda: SPRT(p0=1.0, p1=0.01), r"^p0\b"),
        (lambda: SPRT(p0=0.1, p1=0.0), r"^p1\b"),
        (lambda: SPRT(p0=0.1, p1=0.01, alpha=0.0), r"^alpha\b"),
        (lambda: SPRT(p0=0.1, p1=0.01, beta=1.0), r"^beta\b"),
        (lambda: SPRT(p0=0.1, p1=0.01, alpha=0.6, beta=0.6), r"^alpha\b"),
        (lambda: SPRT(0.1, 0.01).decide(3, 2), r"^failures\b"),
        (lambda: SPRT(0.1, 0.01).decide(0, -1), r"^draws\b"),
        (lambda: SPRT(0.1, 0.01).decide_many(np.array([3]), np.array([2])), r"^failures\b"),
        (lambda: SPRT(0.1, 0.01).decide_many(np.array([0]), np.array([-2])), r"^draws\b"),
    ],
)
def test_bad_arguments_name_the_argument(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
